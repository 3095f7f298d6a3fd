"""The patch VAE p|i of seed 000 §5: a VAE over p×p patches whose decoder makes the i×i blocks
of the patch independent given z and models each block with a small conditional PixelCNN.

The encoder is built only from valid (unpadded) convolutions, elementwise activations,
optional batch norm and a final linear layer, so that :mod:`pyvae.encode` can run it
fully-convolutionally over whole images (every p×p patch at stride 1) with an exactly equal
result.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyvae.models.base import LN2, BaseVAE, ModelOutput, register
from pyvae.models.vae import check_images
from pyvae._validate import check_int
from pyvae.nn.pixelcnn import PixelCNN
from pyvae.ops.reparameterize_kl import reparameterize_kl


def default_encoder_layers(patch_size: int, hidden_channels: int) -> list[list[int]]:
    """3×3 valid convolutions (stride 1) that shrink the patch to 1×1 (p ≤ 5) or 3×3."""
    count = max(1, (patch_size - 3) // 2)
    return [[hidden_channels, 3, 1] for _ in range(count)]


def build_patch_encoder(channels: int, patch_size: int, latent_dim: int,
                        layers: Sequence[Sequence[int]], batch_norm: bool) -> nn.Sequential:
    """Conv2d(padding=0) [+ BatchNorm2d] + ReLU per (out_channels, kernel, stride) layer, then
    Flatten and Linear(-> 2·latent_dim): the only layer types the stride-1 encoder converts."""
    modules: list[nn.Module] = []
    in_ch, size = channels, patch_size
    for index, layer in enumerate(layers):
        if len(layer) != 3:
            raise ValueError(f"PatchVAE: encoder_layers[{index}] must be (out_channels, kernel, "
                             f"stride), got {layer!r}")
        out_ch, kernel, stride = (int(v) for v in layer)
        size = (size - kernel) // stride + 1
        if size < 1:
            raise ValueError(f"PatchVAE: encoder_layers[{index}] = {list(layer)} leaves no "
                             f"output for a {patch_size}×{patch_size} patch")
        modules.append(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, bias=not batch_norm))
        if batch_norm:
            modules.append(nn.BatchNorm2d(out_ch))
        modules.append(nn.ReLU())
        in_ch = out_ch
    modules += [nn.Flatten(), nn.Linear(in_ch * size * size, 2 * latent_dim)]
    return nn.Sequential(*modules)


def to_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """(B, C, p, p) -> (B·(p/i)², C, i, i): the non-overlapping i×i blocks, block-row major."""
    b, c, p, _ = t.shape
    n = p // block
    t = t.reshape(b, c, n, block, n, block).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b * n * n, c, block, block)


def from_blocks(t: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    nb, c, block, _ = t.shape
    n = patch_size // block
    t = t.reshape(-1, n, n, c, block, block).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(-1, c, patch_size, patch_size)


@register
class PatchVAE(BaseVAE):
    """Patch VAE p|i (seed 000): q(z | p×p patch) and p(patch | z) = Π over i×i blocks of a
    conditional PixelCNN (i > 1) or a per-pixel categorical (i = 1).

    Seed configurations: 3|1, 9|1, 9|3, 15|1, 15|3, 15|5 (any p divisible by i works).

    Args:
        patch_size: p.
        independence: i, a divisor of p: the size of the blocks that are independent given z.
        latent_dim: D.
        channels: C of the images (1 or 3 typically).
        beta: weight of the KL term.
        hidden_channels: width of the encoder's convolutions.
        encoder_layers: (out_channels, kernel, stride) per convolution; default: 3×3 stride-1
            convolutions down to 1×1 (p ≤ 5) or 3×3. Strided layers are allowed (the stride-1
            encoder turns their stride into dilation of the later layers).
        batch_norm: batch norm after every encoder convolution (folded in at encoding time).
        cond_channels: channels of the decoder's per-pixel conditioning features.
        decoder_hidden: width of the decoder's hidden layer.
        pixelcnn_hidden, pixelcnn_layers, pixelcnn_kernel: the block PixelCNN (hidden channels,
            residual blocks, kernel size; default kernel 3 for i ≤ 3, else 5).
        color_channels: G of the PixelCNN: 3 models RGB channels in order, 1 jointly; default
            3 for C = 3 else 1. For i = 1 the channels are independent given z.
        num_bins: K intensity levels (256: 8-bit images).

    Shapes:
        patches (B, C, p, p) in [0, 1]; ``encode`` -> mu, logvar (B, D); ``decode`` ->
        conditioning features (B, cond_channels, p, p). ``loss`` reports ``bits_per_dim`` (B,)
        (the cross entropy of the patch) in ``terms`` and ``rate_bits`` (B,).
    """

    def __init__(self, patch_size: int, independence: int, latent_dim: int, channels: int,
                 beta: float = 1.0, hidden_channels: int = 64,
                 encoder_layers: Sequence[Sequence[int]] | None = None,
                 batch_norm: bool = False, cond_channels: int = 32, decoder_hidden: int = 256,
                 pixelcnn_hidden: int = 48, pixelcnn_layers: int = 2,
                 pixelcnn_kernel: int | None = None, color_channels: int | None = None,
                 num_bins: int = 256) -> None:
        super().__init__()
        owner = type(self).__name__
        self.patch_size = check_int(owner, "patch_size", patch_size, 1)
        self.independence = check_int(owner, "independence", independence, 1)
        if patch_size % independence:
            raise ValueError(f"{owner}: independence ({independence}) must divide patch_size "
                             f"({patch_size})")
        self.latent_dim = check_int(owner, "latent_dim", latent_dim, 1)
        self.channels = check_int(owner, "channels", channels, 1)
        self.cond_channels = check_int(owner, "cond_channels", cond_channels, 1)
        self.num_bins = check_int(owner, "num_bins", num_bins, 2)
        self.beta = float(beta)
        if encoder_layers is None:
            encoder_layers = default_encoder_layers(patch_size, hidden_channels)
        encoder_layers = [list(map(int, layer)) for layer in encoder_layers]
        if color_channels is None:
            color_channels = 3 if channels == 3 else 1
        if pixelcnn_kernel is None:
            pixelcnn_kernel = 3 if independence <= 3 else 5
        self._remember(patch_size=patch_size, independence=independence, latent_dim=latent_dim,
                       channels=channels, beta=self.beta, hidden_channels=hidden_channels,
                       encoder_layers=encoder_layers, batch_norm=batch_norm,
                       cond_channels=cond_channels, decoder_hidden=decoder_hidden,
                       pixelcnn_hidden=pixelcnn_hidden, pixelcnn_layers=pixelcnn_layers,
                       pixelcnn_kernel=pixelcnn_kernel, color_channels=color_channels,
                       num_bins=num_bins)
        self.encoder = build_patch_encoder(channels, patch_size, latent_dim, encoder_layers,
                                           batch_norm)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, decoder_hidden), nn.ReLU(),
            nn.Linear(decoder_hidden, cond_channels * patch_size * patch_size))
        if independence == 1:
            # Independent pixels given z: one categorical per subpixel from its features.
            self.pixel_head = nn.Conv2d(cond_channels, channels * num_bins, 1)
            self.pixelcnn = None
        else:
            self.pixel_head = None
            self.pixelcnn = PixelCNN(channels, pixelcnn_hidden, pixelcnn_layers, pixelcnn_kernel,
                                     color_channels=color_channels, cond_channels=cond_channels,
                                     num_bins=num_bins)

    @property
    def num_dims(self) -> int:
        """Subpixels per patch, C·p²: the denominator of bits/dim."""
        return self.channels * self.patch_size ** 2

    def _check(self, method: str, x: torch.Tensor) -> None:
        check_images(f"{type(self).__name__}.{method}", x, self.channels,
                     (self.patch_size, self.patch_size))

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: pixels in [0, 1] centred to [-1, 1] (pointwise, so the
        stride-1 encoder applies it to whole images)."""
        return 2.0 * x - 1.0

    def encode(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters mu, logvar (B, D) of patches (B, C, p, p) in [0, 1]."""
        self._check("encode", patches)
        return self.encoder(self.preprocess(patches)).chunk(2, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Conditioning features (B, cond_channels, p, p) for z of shape (B, D)."""
        p = self.patch_size
        return self.decoder(z).view(-1, self.cond_channels, p, p)

    def log_prob(self, patches: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(patch | features) in nats, (B,): the sum over the independent blocks."""
        if self.pixelcnn is None:
            logits = self.pixel_head(cond)
            b, _, p, _ = logits.shape
            logits = logits.view(b, self.channels, self.num_bins, p, p)
            levels = torch.round(patches.clamp(0, 1) * (self.num_bins - 1)).long()
            nll = F.cross_entropy(logits.transpose(1, 2).float(), levels, reduction="none")
            return -nll.flatten(1).sum(1)
        i = self.independence
        block_lp = self.pixelcnn.log_prob(to_blocks(patches, i), to_blocks(cond, i))
        return block_lp.float().view(patches.shape[0], -1).sum(1)

    def loss(self, patches: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        """Negative ELBO of the patches (mean over the batch), with per-patch bits/dim."""
        mu, logvar = self.encode(patches)
        z, kl = reparameterize_kl(mu, logvar)
        kl = kl.float()
        distortion = -self.log_prob(patches, self.decode(z))
        loss = (distortion + kl_weight * self.beta * kl).mean()
        return ModelOutput(loss=loss, distortion=distortion, rate_bits=kl / LN2,
                           terms={"bits_per_dim": distortion / (self.num_dims * LN2)})

    @torch.no_grad()
    def sample_given(self, cond: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """Draw patches (B, C, p, p) from p(patch | features): block PixelCNNs run in parallel
        over all blocks of all patches, pixel by pixel."""
        if self.pixelcnn is None:
            logits = self.pixel_head(cond)
            b, _, p, _ = logits.shape
            probs = torch.softmax(logits.view(b, self.channels, self.num_bins, p, p).float(), 2)
            flat = probs.permute(0, 1, 3, 4, 2).reshape(-1, self.num_bins)
            levels = torch.multinomial(flat, 1, generator=generator).view(b, self.channels, p, p)
            return levels.to(cond.dtype) / (self.num_bins - 1)
        i = self.independence
        blocks_cond = to_blocks(cond, i)
        shape = (blocks_cond.shape[0], self.channels, i, i)
        return from_blocks(self.pixelcnn.sample(shape, blocks_cond, generator=generator),
                           self.patch_size)

    @torch.no_grad()
    def reconstruct(self, patches: torch.Tensor, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
        """A draw from p(patch | z = posterior mean), (B, C, p, p) in [0, 1]."""
        mu, _ = self.encode(patches)
        return self.sample_given(self.decode(mu), generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Patches (n, C, p, p) drawn from the model with z ~ N(0, I)."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.sample_given(self.decode(z), generator)

"""pyvae.nn: MaskedConv2d against the op, and the PixelCNN's causality, likelihood, learning,
sampling and argument checks.

Most tests run the eager reference backend explicitly (the ``reference`` fixture): they test
the modules, not the kernels (the op's own tests compare every kernel with the reference), and
the reference is fast for tiny tensors. The modules also run once on the default backend
(``test_*_default_backend``).
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyvae
from pyvae.nn import MaskedConv2d, PixelCNN, PixelCNNBlock, bits_per_dim
from pyvae.ops import last_backend, masked_conv2d, masked_conv2d_mask, use_backend


@pytest.fixture
def reference():
    with use_backend("reference"):
        yield


def small_pixelcnn(color_channels=3, *, in_channels=3, hidden=12, num_layers=2, kernel_size=3,
                   cond_channels=0, num_bins=8, dtype=torch.float64):
    model = PixelCNN(in_channels, hidden, num_layers, kernel_size, color_channels=color_channels,
                     cond_channels=cond_channels, num_bins=num_bins)
    return model.to(dtype)


def test_package_exports():
    assert pyvae.nn.MaskedConv2d is MaskedConv2d
    assert set(pyvae.nn.__all__) >= {"MaskedConv2d", "PixelCNN", "bits_per_dim"}
    assert "nn" in pyvae.__all__


# ---- MaskedConv2d -------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size,mask_type,color_channels,dilation,bias", [
    (1, "B", 3, 1, True), (3, "A", 1, 1, True), (3, "B", 3, 2, False), (5, "A", 3, 1, True),
    (7, "B", 1, 1, True)])
def test_masked_conv2d_matches_op(reference, kernel_size, mask_type, color_channels, dilation,
                                  bias):
    conv = MaskedConv2d(6, 9, kernel_size, mask_type=mask_type, color_channels=color_channels,
                        bias=bias, dilation=dilation, dtype=torch.float64)
    assert conv.weight.shape == (9, 6, kernel_size, kernel_size)
    assert (conv.bias is None) == (not bias)
    if bias:
        assert conv.bias.shape == (9,)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    assert y.shape == (2, 9, 7, 8)
    expected = masked_conv2d(x, conv.weight, conv.bias, mask_type=mask_type,
                             color_channels=color_channels, dilation=dilation)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # The masked taps are zero after initialisation, so the stored weight is the kernel.
    mask = masked_conv2d_mask(9, 6, kernel_size, mask_type, color_channels,
                              dtype=torch.float64, device="cpu")
    torch.testing.assert_close(conv.mask(), mask)
    assert bool((conv.weight[mask == 0] == 0).all())
    plain = F.conv2d(x, conv.weight, conv.bias, padding=dilation * (kernel_size // 2),
                     dilation=dilation)
    torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)
    # Training cannot revive a masked tap: its gradient is exactly zero.
    y.square().sum().backward()
    assert bool((conv.weight.grad[mask == 0] == 0).all())


def test_masked_conv2d_init_and_repr():
    torch.manual_seed(0)
    conv2d = nn.Conv2d(6, 9, 5)
    torch.manual_seed(0)
    masked = MaskedConv2d(6, 9, 5, mask_type="A", color_channels=3)
    # nn.Conv2d's initialisation (same draws), restricted to the visible taps.
    torch.testing.assert_close(masked.weight, conv2d.weight * masked.mask(), rtol=0, atol=0)
    torch.testing.assert_close(masked.bias, conv2d.bias, rtol=0, atol=0)
    assert repr(masked) == "MaskedConv2d(6, 9, kernel_size=5, mask_type='A', color_channels=3)"
    no_bias = MaskedConv2d(2, 4, (3, 3), mask_type="B", bias=False, dilation=2)
    assert no_bias.kernel_size == 3
    assert "dilation=2, bias=False" in repr(no_bias)


def test_masked_conv2d_default_backend():
    conv = MaskedConv2d(3, 6, 3, mask_type="B", color_channels=3)
    x = torch.rand(4, 3, 9, 7, requires_grad=True)
    y = conv(x)
    backend = last_backend("masked_conv2d")
    grads = torch.autograd.grad(y.square().sum(), (x, conv.weight, conv.bias))
    with use_backend("reference"):
        y_ref = conv(x)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=f"backend {backend}")
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4, msg=f"backend {backend}")


# ---- PixelCNN: causality and likelihood ---------------------------------------------------------

@pytest.mark.parametrize("color_channels,cond_channels", [(1, 0), (3, 2)])
def test_pixelcnn_is_causal(reference, color_channels, cond_channels):
    """d logits[c, p] / d x[c', q] == 0 unless q is before p in raster order, or q == p and
    channel c' is in an earlier group than c (never, for G = 1)."""
    model = small_pixelcnn(color_channels, cond_channels=cond_channels)
    c, h, w = 3, 5, 5
    # One copy of the same image per output subpixel (c, i, j): examples are independent, so
    # one backward pass gives the Jacobian row of every subpixel in its own copy's gradient.
    outputs = list(itertools.product(range(c), range(h), range(w)))
    channel, row, col = (torch.tensor(v) for v in zip(*outputs))
    copies = len(outputs)
    x = torch.rand(1, c, h, w, dtype=torch.float64).expand(copies, c, h, w).clone()
    x.requires_grad_()
    cond = torch.randn(1, cond_channels, h, w, dtype=torch.float64).expand(copies, -1, -1, -1)
    logits = model(x, cond if cond_channels else None)
    assert logits.shape == (copies, c, model.num_bins, h, w)
    picked = logits[torch.arange(copies), channel, :, row, col]  # (copies, K)
    probe = torch.randn_like(picked)  # a generic direction: no accidental cancellation
    (jacobian,) = torch.autograd.grad((picked * probe).sum(), x)  # (copies, C, H, W)

    group = torch.arange(c) // (c // color_channels)
    reads_own_pixel = torch.zeros(c, c, dtype=torch.bool)  # [channel, channel read at p]
    for b, (ch, i, j) in enumerate(outputs):
        grad = jacobian[b]
        before = torch.zeros(c, h, w, dtype=torch.bool)
        before.view(c, -1)[:, :i * w + j] = True
        before[:, i, j] = group < group[ch]
        assert bool((grad[~before] == 0).all()), (ch, i, j)
        # ... and the allowed context is actually read (a ReLU may be off at some pixels, so
        # the earlier channels of the pixel itself are checked over all pixels together).
        if j > 0:
            assert bool((grad[:, i, j - 1] != 0).any()), (ch, i, j)
        if i > 0:
            assert bool((grad[:, i - 1, j] != 0).any()), (ch, i, j)
        reads_own_pixel[ch] |= grad[:, i, j] != 0
    assert torch.equal(reads_own_pixel, group[None, :] < group[:, None])


@pytest.mark.parametrize("color_channels", [1, 2])
def test_pixelcnn_joint_distribution_sums_to_one(reference, color_channels):
    """Summed over every possible image, exp(log_prob) is 1: the autoregressive factors chain
    into a normalised joint distribution only when the network is causal."""
    model = small_pixelcnn(color_channels, in_channels=2, hidden=8, num_bins=3)
    levels = torch.tensor(list(itertools.product(range(3), repeat=4)), dtype=torch.float64)
    images = (levels / 2).view(-1, 2, 1, 2)  # all 3^4 images of 2 channels x 1 x 2 pixels
    total = torch.logsumexp(model.log_prob(images), dim=0)
    torch.testing.assert_close(total, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-10)


def test_log_prob_is_the_sum_of_categorical_log_probs(reference):
    model = small_pixelcnn(3, cond_channels=2, num_bins=16)
    x = torch.rand(4, 3, 4, 5, dtype=torch.float64)  # not quantised: log_prob rounds it
    cond = torch.randn(4, 2, 4, 5, dtype=torch.float64)
    log_prob = model.log_prob(x, cond)
    assert log_prob.shape == (4,)

    levels = torch.round(x * 15).long()
    x_q = levels.double() / 15
    logits = model(x_q, cond)
    by_hand = torch.zeros(4, dtype=torch.float64)
    for b, ch, i, j in itertools.product(range(4), range(3), range(4), range(5)):
        row = logits[b, ch, :, i, j]
        by_hand[b] += row[levels[b, ch, i, j]] - torch.logsumexp(row, dim=0)
    torch.testing.assert_close(log_prob, by_hand, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(model.log_prob(x_q, cond), log_prob)

    log_prob.sum().backward()  # a training loss: gradients reach every parameter
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_bits_per_dim(reference):
    log_prob = torch.tensor([-12 * math.log(2.0), -6 * math.log(2.0)])
    torch.testing.assert_close(bits_per_dim(log_prob, 12), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(PixelCNN.bits_per_dim(log_prob, 6), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(log_prob, 0)
    # Zero logits are the uniform distribution over 256 levels: exactly 8 bits per dimension.
    model = small_pixelcnn(3, num_bins=256, dtype=torch.float32)
    with torch.no_grad():
        model.output_conv.weight.zero_()
        model.output_conv.bias.zero_()
    x = torch.rand(5, 3, 4, 4)
    torch.testing.assert_close(bits_per_dim(model.log_prob(x), 3 * 4 * 4), torch.full((5,), 8.0))


def test_pixelcnn_learns_a_toy_distribution(reference):
    """Binary 8×8 images whose columns are constant: 8 random bits per image, 0.125 bits/dim
    for a model that copies the pixel above, 1 bit/dim for one that ignores the context."""
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (128, 1, 1, 8), generator=generator).float()
    images = bits.expand(128, 1, 8, 8)
    torch.manual_seed(0)
    model = PixelCNN(1, 16, 1, 3, color_channels=1, num_bins=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = bits_per_dim(model.log_prob(images), 64).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8
    assert losses[-1] < 0.4, losses


# ---- PixelCNN: conditioning, shapes and arguments -----------------------------------------------

def test_conditioning_changes_the_output(reference):
    model = small_pixelcnn(3, cond_channels=4)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    cond = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    other = cond.clone()
    other[1] += 1.0
    a, b = model(x, cond), model(x, other)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # examples are independent
    assert (a[1] - b[1]).abs().max() > 1e-3
    assert (model.log_prob(x, cond) != model.log_prob(x, other))[1]
    with pytest.raises(ValueError, match="pass cond of shape"):
        model(x)
    with pytest.raises(ValueError, match="cond must have shape"):
        model(x, cond[:, :3])
    with pytest.raises(ValueError, match="cond_channels=0"):
        small_pixelcnn(3)(x, cond)


def test_tiny_images_with_a_large_batch(reference):
    """The patch VAE's use: 3×3 blocks, a batch in the tens of thousands, one forward pass."""
    model = small_pixelcnn(3, hidden=12, num_layers=1, cond_channels=4, num_bins=16,
                           dtype=torch.float32)
    x = torch.rand(20000, 3, 3, 3)
    cond = torch.randn(20000, 4, 3, 3)
    log_prob = model.log_prob(x, cond)
    assert log_prob.shape == (20000,) and bool(torch.isfinite(log_prob).all())
    torch.testing.assert_close(log_prob[-7:], model.log_prob(x[-7:], cond[-7:]))


@pytest.mark.parametrize("size", [32, 64])
def test_full_size_images(reference, size):
    model = small_pixelcnn(3, hidden=6, num_layers=1, num_bins=256, dtype=torch.float32)
    x = torch.rand(2, 3, size, size)
    assert model(x).shape == (2, 3, 256, size, size)
    bpd = bits_per_dim(model.log_prob(x), 3 * size * size)
    assert bpd.shape == (2,) and bool(((bpd > 1) & (bpd < 20)).all())


def test_pixelcnn_default_backend():
    model = small_pixelcnn(3, cond_channels=2, num_bins=16, dtype=torch.float32)
    x, cond = torch.rand(3, 3, 6, 5), torch.randn(3, 2, 6, 5)
    log_prob = model.log_prob(x, cond)
    grads = torch.autograd.grad(log_prob.sum(), list(model.parameters()))
    with use_backend("reference"):
        log_prob_ref = model.log_prob(x, cond)
        grads_ref = torch.autograd.grad(log_prob_ref.sum(), list(model.parameters()))
    torch.testing.assert_close(log_prob, log_prob_ref, rtol=1e-5, atol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"hidden_channels \(16\) must be a multiple"):
        PixelCNN(3, 16, 1, 3, color_channels=3)
    with pytest.raises(ValueError, match=r"in_channels \(4\) must be a multiple"):
        PixelCNN(4, 12, 1, 3, color_channels=3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        PixelCNN(3, 12, 1, 4, color_channels=3)
    with pytest.raises(ValueError, match="num_bins must be >= 2"):
        PixelCNN(3, 12, 1, 3, color_channels=3, num_bins=1)
    with pytest.raises(ValueError, match="num_layers must be >= 0"):
        PixelCNN(3, 12, -1, 3, color_channels=3)
    with pytest.raises(TypeError, match="color_channels must be an int"):
        PixelCNN(3, 12, 1, 3, color_channels=1.5)
    with pytest.raises(ValueError, match=r"out_channels \(8\) must be a multiple"):
        MaskedConv2d(3, 8, 3, mask_type="A", color_channels=3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        MaskedConv2d(3, 6, 2, mask_type="A")
    with pytest.raises(ValueError, match="kernel_size must be square"):
        MaskedConv2d(3, 6, (3, 5), mask_type="A")
    with pytest.raises(ValueError, match="mask_type must be 'A' or 'B'"):
        MaskedConv2d(3, 6, 3, mask_type="C")
    model = small_pixelcnn(3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\)"):
        model(torch.rand(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape must be \(N, 3, H, W\)"):
        model.sample((2, 4, 4))


# ---- PixelCNN: sampling -------------------------------------------------------------------------

class ContextRule(PixelCNN):
    """A PixelCNN whose logits put all the mass on a known function of the causal context:
    level(i, j, c) = (level(i, j-1, c) + level(i-1, j, c) + the levels of the earlier groups
    at (i, j) + c + 1) mod K, with zeros outside the image. Its "features" are the target
    levels and its head turns them into one-hot logits. Sampling reproduces the rule only if
    every step reads values that were already generated, in raster order, group by group."""

    def forward_features(self, x, cond=None):
        n, c, h, w = x.shape
        groups = self.color_channels
        levels = self.quantize(x)
        left = F.pad(levels, (1, 0))[..., :w]
        above = F.pad(levels, (0, 0, 1, 0))[..., :h, :]
        group_sums = levels.view(n, groups, c // groups, h, w).sum(2)
        earlier = (group_sums.cumsum(1) - group_sums).repeat_interleave(c // groups, dim=1)
        return (left + above + earlier + torch.arange(c).view(1, c, 1, 1) + 1) % self.num_bins

    def forward_head(self, features):
        logits = torch.full((*features.shape, self.num_bins), -1e4)
        logits.scatter_(-1, features.unsqueeze(-1), 0.0)
        return logits.permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("color_channels", [1, 3])
def test_sample_follows_the_causal_context(reference, color_channels):
    model = ContextRule(3, 6, 1, 3, color_channels=color_channels, num_bins=5)
    assert model.receptive_rows == 2  # H = 5 > 3: sampling runs on cropped rows
    h, w, k = 5, 4, 5
    expected = torch.zeros(3, h, w, dtype=torch.long)
    per_group = 3 // color_channels
    for i, j, c in itertools.product(range(h), range(w), range(3)):
        left = expected[c, i, j - 1] if j else 0
        above = expected[c, i - 1, j] if i else 0
        earlier = expected[:c - c % per_group, i, j].sum()
        expected[c, i, j] = (left + above + earlier + c + 1) % k
    samples = model.sample((2, 3, h, w), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.quantize(samples), expected.expand(2, 3, h, w))


def test_sample_draws_from_the_model(reference):
    """1×1 images, two groups: the frequencies of channel 0 and of channel 1 given channel 0
    match the softmax of the model's logits."""
    model = small_pixelcnn(2, in_channels=2, hidden=8, num_bins=4)
    n = 40000
    samples = model.sample((n, 2, 1, 1), generator=torch.Generator().manual_seed(1))
    levels = model.quantize(samples)[:, :, 0, 0]
    with torch.no_grad():
        first = torch.softmax(model(torch.zeros(1, 2, 1, 1, dtype=torch.float64))[0, 0, :, 0, 0],
                              dim=0)
        counts = torch.bincount(levels[:, 0], minlength=4).double()
        # Binomial standard errors: 5 sigma bounds the test's flakiness far below 1e-5.
        assert bool(((counts / n - first).abs() < 5 * (first * (1 - first) / n).sqrt()).all())
        for v in range(4):
            given = torch.tensor([v / 3, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
            second = torch.softmax(model(given)[0, 1, :, 0, 0], dim=0)
            rows = levels[levels[:, 0] == v, 1]
            freq = torch.bincount(rows, minlength=4).double() / len(rows)
            tolerance = 5 * (second * (1 - second) / len(rows)).sqrt() + 1e-3
            assert bool(((freq - second).abs() < tolerance).all()), (v, freq, second)


def test_sample_is_reproducible_and_scoreable(reference):
    model = small_pixelcnn(3, hidden=6, num_layers=1, cond_channels=2, num_bins=16)
    cond = torch.randn(5, 2, 4, 3, dtype=torch.float64)
    a = model.sample((5, 3, 4, 3), cond, generator=torch.Generator().manual_seed(7))
    b = model.sample((5, 3, 4, 3), cond, generator=torch.Generator().manual_seed(7))
    c = model.sample((5, 3, 4, 3), cond, generator=torch.Generator().manual_seed(8))
    assert a.shape == (5, 3, 4, 3) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool((a != c).any())
    assert bool(((a >= 0) & (a <= 1)).all())
    torch.testing.assert_close(a * 15, torch.round(a * 15))  # on the quantisation grid
    assert bool(torch.isfinite(model.log_prob(a, cond)).all())
    assert model.sample((0, 3, 4, 3), cond[:0]).shape == (0, 3, 4, 3)
    assert model.log_prob(a[:0], cond[:0]).shape == (0,)


def test_cropped_rows_give_the_full_image_logits(reference):
    """sample() runs the network on the last receptive_rows + 1 rows only; the logits of the
    last row must equal those of the full image."""
    model = small_pixelcnn(3, num_layers=2, cond_channels=2)
    x = torch.rand(2, 3, 9, 6, dtype=torch.float64)
    cond = torch.randn(2, 2, 9, 6, dtype=torch.float64)
    full = model(x, cond)
    for i in range(9):
        rows = slice(max(0, i - model.receptive_rows), i + 1)
        cropped = model(x[:, :, rows], cond[:, :, rows])
        torch.testing.assert_close(cropped[..., -1, :], full[..., i, :], rtol=1e-12, atol=1e-12)


def test_block_is_a_residual_update(reference):
    block = PixelCNNBlock(6, 3, color_channels=3).double()
    with torch.no_grad():
        block.mix.weight.zero_()
        block.mix.bias.zero_()
    h = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(block(h), h, rtol=0, atol=0)

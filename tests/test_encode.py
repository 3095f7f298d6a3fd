"""Stride-1 patch encoding equals cutting out every patch and encoding it alone."""
import pytest
import torch
from torch import nn

from pyvae.encode import encode_patches, fully_convolutional
from pyvae.models import PatchVAE

SEED_CONFIGS = [(3, 1), (9, 1), (9, 3), (15, 1), (15, 3), (15, 5)]


def per_patch_reference(model, images):
    """Every patch cut out with explicit loops and encoded alone (no unfold): ground truth."""
    p = model.patch_size
    n, _, h, w = images.shape
    out = torch.empty(n, model.latent_dim, h - p + 1, w - p + 1)
    model.eval()
    with torch.no_grad():
        for y in range(h - p + 1):
            patches = torch.stack([images[:, :, y:y + p, x:x + p] for x in range(w - p + 1)], 1)
            mu, _ = model.encode(patches.flatten(0, 1))
            out[:, :, y] = mu.view(n, w - p + 1, -1).permute(0, 2, 1)
    return out


def trained_batch_norm(model, channels, p):
    """Give the batch-norm layers non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.encode(torch.rand(64, channels, p, p) * 0.7 + 0.1)
    return model.eval()


def assert_relative_close(actual, expected, tolerance=1e-5):
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance}"


@pytest.mark.parametrize("p,i", SEED_CONFIGS)
def test_stride1_equals_per_patch_for_seed_configurations(p, i):
    model = PatchVAE(p, i, 7, 3, hidden_channels=16, pixelcnn_hidden=12, pixelcnn_layers=1)
    images = torch.rand(2, 3, p + 6, p + 3)
    expected = per_patch_reference(model, images)
    mu, logvar = encode_patches(model, images, return_logvar=True)
    assert mu.shape == logvar.shape == (2, 7, 7, 4)
    assert_relative_close(mu, expected)
    assert_relative_close(encode_patches(model, images, method="unfold"), expected)


@pytest.mark.parametrize("layers", [
    [[8, 3, 1], [8, 3, 2], [8, 3, 1]],           # 15 -> 13 -> 6 -> 4
    [[6, 3, 2], [8, 2, 2], [8, 1, 1]],           # a stride-2 layer whose input ends unused
    [[8, 5, 1], [8, 3, 3]],                      # stride 3
])
def test_stride1_with_strided_layers_and_batch_norm(layers):
    model = trained_batch_norm(PatchVAE(15, 3, 5, 1, encoder_layers=layers, batch_norm=True),
                               1, 15)
    images = torch.rand(3, 1, 26, 21)
    assert_relative_close(encode_patches(model, images), per_patch_reference(model, images))


def test_pooling_and_extra_linear_layers_convert():
    class Custom(nn.Module):
        patch_size, latent_dim, channels = 9, 4, 2
        preprocess = staticmethod(lambda x: x)

        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Conv2d(2, 6, 3), nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 2),
                nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(6, 16),
                nn.Tanh(), nn.Linear(16, 8))

        def encode(self, x):
            return self.encoder(x).chunk(2, dim=1)

    model = Custom()
    images = torch.rand(2, 2, 17, 14)
    assert_relative_close(encode_patches(model, images), per_patch_reference(model, images))


def test_tiles_give_the_whole_image_result():
    model = PatchVAE(9, 3, 6, 1, encoder_layers=[[8, 3, 1], [8, 3, 2]])
    images = torch.rand(2, 1, 41, 33)
    whole = encode_patches(model, images)
    for tile in (9, 10, 17, 40):
        torch.testing.assert_close(encode_patches(model, images, tile_size=tile), whole,
                                   rtol=1e-6, atol=1e-6)


def test_uint8_images_batches_and_mode_restored():
    model = PatchVAE(3, 1, 4, 3)
    images = torch.randint(0, 256, (5, 3, 8, 9), dtype=torch.uint8)
    expected = encode_patches(model, images.float() / 255)
    torch.testing.assert_close(encode_patches(model, images, batch_size=2), expected)
    assert model.training  # encode_patches restores the mode it found


def test_bfloat16_autocast_is_close():
    model = PatchVAE(9, 3, 6, 1)
    images = torch.rand(2, 1, 20, 20)
    exact = encode_patches(model, images)
    low = encode_patches(model, images, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=5e-2, atol=5e-2)


def test_unconvertible_layers_are_named():
    padded = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 9, 2))
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) is padded"):
        fully_convolutional(padded, 3)
    odd = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Upsample(scale_factor=2), nn.Flatten(),
                        nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"cannot convert encoder layer '1' \(Upsample\)"):
        fully_convolutional(odd, 3)
    no_linear = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match="must end in Flatten and Linear"):
        fully_convolutional(no_linear, 3)
    model = PatchVAE(9, 3, 4, 1)
    with pytest.raises(ValueError, match="smaller than the 9×9 patches"):
        encode_patches(model, torch.rand(1, 1, 8, 20))
    with pytest.raises(ValueError, match="channels"):
        encode_patches(model, torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="method"):
        encode_patches(model, torch.rand(1, 1, 20, 20), method="fft")
    with pytest.raises(TypeError, match="patch model"):
        encode_patches(nn.Linear(2, 2), torch.rand(1, 1, 20, 20))

"""FLOP counts of per-patch and stride-1 encoding (count_flops, encode_flops) against hand
counts, torch's own FLOP counter, and the in-place activations of the stride-1 network."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pyvae.encode import count_flops, encode_flops, fully_convolutional
from pyvae.models import PatchVAE


class Tiny(nn.Module):
    """p = 5, C = 2: conv 3×3 (5 -> 3), conv 2×2 stride 2 (3 -> 1), linear 6 -> 8."""
    patch_size, latent_dim, channels = 5, 4, 2

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 2, stride=2),
                                     nn.ReLU(), nn.Flatten(), nn.Linear(6, 8))


def test_hand_counts_of_a_tiny_encoder():
    model = Tiny()
    # Per patch: 4·3·3 outputs × 2·3·3 MACs + 6 outputs × 4·2·2 MACs + 8 outputs × 6 MACs.
    assert count_flops(model.encoder, (1, 2, 5, 5)) == 2 * (36 * 18 + 6 * 16 + 8 * 6) == 1584
    assert count_flops(model.encoder, (3, 2, 5, 5)) == 3 * 1584  # per batch
    # Stride-1 on 7×6: conv1 -> 5×4, conv2 (stride 1 now) -> 4×3, the linear layer as a 1×1
    # convolution (dilation 2) -> 4×3.
    flops = encode_flops(model, 7, 6)
    assert flops.stride1 == 2 * (4 * 5 * 4 * 18 + 6 * 4 * 3 * 16 + 8 * 4 * 3 * 6) == 6336
    assert (flops.per_patch, flops.patches, flops.per_patch_total) == (1584, 6, 9504)
    assert flops.ratio == pytest.approx(9504 / 6336)


def test_grouped_conv_pooling_and_batch_norm():
    encoder = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AvgPool2d(2, stride=1), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(4, 3))
    # 36 outputs × 1·3·3 (groups) + average pooling 16 outputs × 2·2 + 3 outputs × 4.
    assert count_flops(encoder, (1, 2, 5, 5)) == 2 * (36 * 9 + 16 * 4 + 3 * 4) == 800
    # The network's average pooling is a depthwise convolution: counted the same.
    network = fully_convolutional(encoder, 5)
    assert any(isinstance(m, nn.Conv2d) and m.groups == 4 for m in network)
    assert count_flops(network, (1, 2, 5, 5)) == 800


@pytest.mark.parametrize("p", [9, 15])
def test_patch_vae_counts_match_torch_flop_counter(p):
    model = PatchVAE(p, 3, 16, 3, hidden_channels=8, pixelcnn_hidden=12, pixelcnn_layers=1)
    flops = encode_flops(model, 20, 17)
    network = fully_convolutional(model.encoder, p)
    for module, shape, expected in [(model.encoder, (1, 3, p, p), flops.per_patch),
                                    (network, (1, 3, 20, 17), flops.stride1)]:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(torch.zeros(shape))
        assert counter.get_total_flops() == expected
    # By hand: 3×3 convolutions p -> p−2 -> ... -> 3, then the linear layer on 8·3·3.
    sizes = list(range(p - 2, 2, -2))
    by_hand = 2 * 9 * (sizes[0] ** 2 * 8 * 3 + sum(s * s * 8 * 8 for s in sizes[1:])) \
        + 2 * 8 * 9 * 32
    assert flops.per_patch == by_hand
    assert flops.patches == (20 - p + 1) * (17 - p + 1)


def test_counting_leaves_the_module_alone_and_names_what_it_cannot_count():
    model = PatchVAE(9, 3, 4, 1, batch_norm=True).train()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    count_flops(model.encoder, (1, 1, 9, 9))
    assert model.encoder.training and all(m.training for m in model.encoder.modules())
    after = model.encoder.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v)
               for k, v in before.items())
    with pytest.raises(ValueError, match=r"cannot count layer '1' \(Upsample\)"):
        count_flops(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2)),
                    (1, 1, 5, 5))
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(model.encoder, (1, 0, 9, 9))
    with pytest.raises(ValueError, match="encode_flops: height must be >= 9"):
        encode_flops(model, 8, 20)
    no_channels = type("NoChannels", (), dict(encoder=model.encoder, patch_size=9,
                                              latent_dim=4))()
    with pytest.raises(TypeError, match="int .channels"):
        encode_flops(no_channels, 20, 20)


def test_network_activations_run_in_place_only_on_its_own_maps():
    network = fully_convolutional(PatchVAE(9, 3, 4, 1).encoder, 9)
    relus = [m for m in network if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    # A ReLU on the network's input, or after a layer whose backward reads its output, is not.
    encoder = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 4, 3), nn.Tanh(), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 9, 2))
    network = fully_convolutional(encoder, 5)
    assert [m.inplace for m in network if isinstance(m, nn.ReLU)] == [False, False]
    image = torch.randn(1, 1, 7, 7)
    kept = image.clone()
    network(image)
    assert torch.equal(image, kept)
    # Autograd through the in-place network gives the gradient of the out-of-place one.
    network = fully_convolutional(PatchVAE(9, 3, 4, 1).encoder, 9)
    reference = fully_convolutional(PatchVAE(9, 3, 4, 1).encoder, 9)
    reference.load_state_dict(network.state_dict())
    for m in reference:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    grads = []
    for net in (network, reference):
        torch.manual_seed(0)
        x = torch.randn(1, 1, 12, 12, requires_grad=True)
        net(x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])

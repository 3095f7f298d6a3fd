"""pyvae.models: every model trains, reports finite rates, runs on pyvae's ops (the dispatched
kernel matches the reference backend), round-trips its config, and rejects bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from pyvae import models
from pyvae.models.conv import feature_sizes
from pyvae.models.hierarchical import precision_weighted
from pyvae.models.patch_vae import from_blocks, to_blocks
from pyvae.ops import last_backend, use_backend
from pyvae.ops.kl_decomposition import kl_decomposition

SEED_CONFIGS = [(3, 1), (9, 1), (9, 3), (15, 1), (15, 3), (15, 5)]


def rectangles(n, channels, height, width, generator):
    """Binary images of one random axis-aligned rectangle each: structured, never all zero."""
    images = torch.zeros(n, channels, height, width)
    for k in range(n):
        y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=generator)) for s in (height, width))
        y1 = y0 + 2 + int(torch.randint(0, height - y0 - 1, (1,), generator=generator))
        x1 = x0 + 2 + int(torch.randint(0, width - x0 - 1, (1,), generator=generator))
        images[k, :, y0:y1, x0:x1] = 1.0
    return images


def smooth_patches(n, channels, size, generator, levels=256):
    """Quantised smooth gradients plus a little noise: patches a PixelCNN can learn."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a, b, c = (torch.rand(n, channels, 1, 1, generator=generator) for _ in range(3))
    x = (0.5 * a * ys + 0.5 * b * xs + 0.3 * c + 0.05 * torch.rand(n, channels, size, size,
                                                                   generator=generator))
    return torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)


def model_cases():
    return [
        ("vae", lambda: models.VAE(6, 1, 16), (1, 16, 16)),
        ("beta_vae_gaussian", lambda: models.BetaVAE(6, 3, (13, 9), beta=4.0,
                                                     likelihood="gaussian"), (3, 13, 9)),
        ("beta_tcvae", lambda: models.BetaTCVAE(6, 1, 16, dataset_size=1000), (1, 16, 16)),
        ("vae_mlp", lambda: models.VAE(6, 1, (12, 10), architecture="mlp", hidden=40),
         (1, 12, 10)),
        ("beta_tcvae_mlp", lambda: models.BetaTCVAE(6, 1, 16, dataset_size=1000,
                                                    architecture="mlp", hidden=32), (1, 16, 16)),
        ("hierarchical", lambda: models.HierarchicalVAE([6, 3], [1.0, 2.0], 1, 16), (1, 16, 16)),
        ("ladder", lambda: models.HierarchicalVAE([6, 4, 2], [1.0, 0.5, 2.0], 1, 16,
                                                  inference="ladder"), (1, 16, 16)),
        ("capacity", lambda: models.CapacityAE(6, 0.5, 1, 16), (1, 16, 16)),
        ("patch_9_3", lambda: models.PatchVAE(9, 3, 6, 1, pixelcnn_hidden=16,
                                              pixelcnn_layers=1), (1, 9, 9)),
        ("patch_3_1", lambda: models.PatchVAE(3, 1, 4, 3), (3, 3, 3)),
    ]


def data_for(shape, n, generator):
    c, h, w = shape
    if h == w and h in (3, 9):  # patch models: 8-bit natural-looking patches
        return smooth_patches(n, c, h, generator)
    return rectangles(n, c, h, w, generator)


@pytest.mark.parametrize("name,make,shape", model_cases(), ids=[c[0] for c in model_cases()])
def test_model_trains_with_finite_rates(name, make, shape):
    generator = torch.Generator().manual_seed(7)
    data = data_for(shape, 48, generator)
    model = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        out = model.loss(batch)
        assert out.distortion.shape == (16,) and out.rate_bits.shape == (16,)
        assert torch.isfinite(out.rate_bits).all() and (out.rate_bits >= -1e-4).all()
        for value in out.terms.values():
            assert value.shape[0] == 16 and torch.isfinite(value).all()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05 * abs(first), (name, first, last)


@pytest.mark.parametrize("name,make,shape", model_cases(), ids=[c[0] for c in model_cases()])
def test_model_runs_on_the_ops_and_matches_the_reference_backend(name, make, shape):
    model = make().eval() if name == "capacity" else make()
    x = data_for(shape, 6, torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    out = model.loss(x)
    assert last_backend("reparameterize_kl") == "cpu"
    if name == "beta_tcvae":
        assert last_backend("kl_decomposition") == "cpu"
    if name == "patch_9_3":
        assert last_backend("masked_conv2d") == "cpu"
    with use_backend("reference"):
        torch.manual_seed(11)  # the same Philox seed: the same noise on both backends
        ref = model.loss(x)
    assert last_backend("reparameterize_kl") == "reference"
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.rate_bits, ref.rate_bits, rtol=1e-4, atol=1e-4)
    for key in out.terms:
        torch.testing.assert_close(out.terms[key], ref.terms[key], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,make,shape", model_cases(), ids=[c[0] for c in model_cases()])
def test_config_round_trip_rebuilds_the_same_function(name, make, shape):
    import json

    model = make().eval()
    rebuilt = models.build_model(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = data_for(shape, 5, torch.Generator().manual_seed(5))
    for a, b in zip(model.encode(x), rebuilt.encode(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert type(rebuilt) is type(model)


@pytest.mark.parametrize("size", [8, 16, 28, 64, (13, 9), (5, 31)])
def test_conv_decoder_restores_every_image_size(size):
    h, w = (size, size) if isinstance(size, int) else size
    model = models.VAE(3, 2, size)
    x = torch.rand(2, 2, h, w)
    assert model.decode(model.encode(x)[0]).shape == (2, 2, h, w)
    assert model.reconstruct(x).shape == (2, 2, h, w)
    assert model.sample(3).shape == (3, 2, h, w)
    if size == 64:  # the network of Higgins et al.: four stride-2 layers down to 4×4
        assert feature_sizes((64, 64)) == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]


def test_vae_architectures_and_errors():
    mlp = models.VAE(10, 1, 64, architecture="mlp")
    # the fully-connected networks of Chen et al. for 64×64 shapes
    widths = [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [1200, 1200, 20, 1200, 1200, 1200, 4096]
    assert mlp.config["architecture"] == "mlp" and mlp.config["hidden"] == 1200
    assert models.VAE(10, 1, 64).config["hidden"] == 256  # the conv network's default
    assert not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())
    # an older config without "architecture" rebuilds the conv network
    old = {k: v for k, v in models.VAE(4, 1, 16).config.items() if k != "architecture"}
    assert models.build_model(old).architecture == "conv"
    with pytest.raises(ValueError, match="VAE: architecture must be one of"):
        models.VAE(4, 1, 16, architecture="resnet")
    with pytest.raises(ValueError, match="BetaTCVAE: hidden must be >= 1"):
        models.BetaTCVAE(4, 1, 16, dataset_size=10, hidden=0)


def test_vae_loss_is_distortion_plus_beta_kl():
    model = models.VAE(5, 1, 12, beta=3.0)
    x = rectangles(6, 1, 12, 12, torch.Generator().manual_seed(1))
    mu, logvar = model.encode(x)
    eps = torch.randn(mu.shape)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    distortion = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="none").sum(
        (1, 2, 3))
    out = model.loss(x, kl_weight=0.5)
    # The noise is internal to the op; the KL is not, and the loss weights it by β·kl_weight.
    torch.testing.assert_close(out.rate_bits, kl / math.log(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, (out.distortion + 1.5 * kl).mean(), rtol=1e-5, atol=1e-4)
    assert distortion.shape == out.distortion.shape


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian", "categorical"])
def test_likelihoods_against_torch_distributions(kind):
    lik = models.Likelihood(kind, 3, num_bins=7)
    x = torch.round(torch.rand(4, 3, 5, 6) * 6) / 6
    params = torch.randn(4, 3 * lik.params_per_subpixel, 5, 6)
    if kind == "bernoulli":
        expected = -torch.distributions.Bernoulli(logits=params, validate_args=False).log_prob(x).sum((1, 2, 3))
    elif kind == "gaussian":
        scale = lik.log_scale.exp().view(1, 3, 1, 1).expand_as(params)
        expected = -torch.distributions.Normal(params, scale).log_prob(x).sum((1, 2, 3))
    else:
        logits = params.view(4, 3, 7, 5, 6).permute(0, 1, 3, 4, 2)
        levels = torch.round(x * 6).long()
        expected = -torch.distributions.Categorical(logits=logits).log_prob(levels).sum((1, 2, 3))
    torch.testing.assert_close(lik.nll(params, x), expected.detach(), rtol=1e-5, atol=1e-4)
    mean = lik.mean(params)
    assert mean.shape == x.shape and (mean >= 0).all() and (mean <= 1).all()


def test_beta_tcvae_weights_the_decomposition():
    model = models.BetaTCVAE(4, 1, 8, dataset_size=500, alpha=2.0, beta=5.0, gamma=0.5,
                             estimator="mws")
    x = rectangles(10, 1, 8, 8, torch.Generator().manual_seed(2))
    out = model.loss(x, kl_weight=0.8)
    penalty = 2.0 * out.terms["mi"] + 5.0 * out.terms["tc"] + 0.5 * out.terms["dim_kl"]
    torch.testing.assert_close(out.loss, (out.distortion + 0.8 * penalty).mean(),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="estimator"):
        models.BetaTCVAE(4, 1, 8, dataset_size=500, estimator="naive")


def test_hierarchical_layer_rates_and_betas():
    model = models.HierarchicalVAE([5, 3, 2], [1.0, 4.0, 0.25], 1, 12)
    x = rectangles(7, 1, 12, 12, torch.Generator().manual_seed(4))
    out = model.loss(x)
    rates = out.terms["layer_rates_bits"]
    assert rates.shape == (7, 3) and (rates >= -1e-5).all()
    torch.testing.assert_close(out.rate_bits, rates.sum(1))
    betas = torch.tensor([1.0, 4.0, 0.25])
    torch.testing.assert_close(out.loss, (out.distortion + (rates * math.log(2) * betas).sum(1))
                               .mean(), rtol=1e-5, atol=1e-3)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (7, 10)
    assert model.sample(4).shape == (4, 1, 12, 12)
    with pytest.raises(ValueError, match="one β per latent layer"):
        models.HierarchicalVAE([5, 3], [1.0], 1, 12)
    with pytest.raises(ValueError, match="inference"):
        models.HierarchicalVAE([5, 3], [1.0, 1.0], 1, 12, inference="bottom-up")


def test_precision_weighting_matches_the_ladder_formula():
    mu_hat, lv_hat, pm, plv = (torch.randn(6, 5, dtype=torch.float64) for _ in range(4))
    mu, lv = precision_weighted(mu_hat, lv_hat, pm, plv)
    precision = torch.exp(-lv_hat) + torch.exp(-plv)
    torch.testing.assert_close(lv, -torch.log(precision))
    torch.testing.assert_close(mu, (mu_hat * torch.exp(-lv_hat) + pm * torch.exp(-plv)) / precision)


def test_capacity_autoencoder_bound_and_normalised_code():
    model = models.CapacityAE(8, noise_std=0.5, channels=1, image_size=16, signal_std=2.0)
    assert model.capacity_bits == pytest.approx(4 * math.log2(1 + 16.0))
    x = rectangles(64, 1, 16, 16, torch.Generator().manual_seed(6))
    mu, logvar = model.encode(x)
    torch.testing.assert_close(mu.var(0, unbiased=False), torch.full((8,), 4.0), rtol=1e-3,
                               atol=1e-3)
    torch.testing.assert_close(logvar, torch.full_like(mu, 2 * math.log(0.5)))
    out = model.loss(x)
    torch.testing.assert_close(out.rate_bits, torch.full((64,), model.capacity_bits))
    with pytest.raises(ValueError, match="noise_std"):
        models.CapacityAE(8, noise_std=0.0, channels=1, image_size=16)


@pytest.mark.parametrize("p,i", SEED_CONFIGS)
def test_patch_vae_seed_configurations(p, i):
    model = models.PatchVAE(p, i, 5, 3, pixelcnn_hidden=12, pixelcnn_layers=1)
    patches = smooth_patches(4, 3, p, torch.Generator().manual_seed(p * 10 + i))
    out = model.loss(patches)
    torch.testing.assert_close(out.terms["bits_per_dim"],
                               out.distortion / (3 * p * p * math.log(2)))
    # Every encoder convolution is unpadded (so the stride-1 encoder is exact) and it ends in
    # one linear layer.
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.padding == (0, 0) for c in convs)
    assert isinstance(model.encoder[-1], torch.nn.Linear)
    # The patch likelihood is the sum over its independent blocks.
    cond = model.decode(model.encode(patches)[0])
    if i > 1:
        per_block = [model.pixelcnn.log_prob(patches[:, :, r:r + i, c:c + i],
                                             cond[:, :, r:r + i, c:c + i])
                     for r in range(0, p, i) for c in range(0, p, i)]
        torch.testing.assert_close(model.log_prob(patches, cond), sum(per_block),
                                   rtol=1e-5, atol=1e-3)
    drawn = model.sample(2)
    assert drawn.shape == (2, 3, p, p) and drawn.min() >= 0 and drawn.max() <= 1
    levels = drawn * 255
    torch.testing.assert_close(levels, torch.round(levels))


def test_patch_blocks_round_trip():
    t = torch.randn(3, 2, 15, 15)
    blocks = to_blocks(t, 5)
    assert blocks.shape == (27, 2, 5, 5)
    torch.testing.assert_close(blocks[4], t[1 - 1, :, 5:10, 5:10])  # block (1, 1) of patch 0
    torch.testing.assert_close(from_blocks(blocks, 15), t)


def test_patch_vae_strided_encoder_and_errors():
    model = models.PatchVAE(15, 3, 4, 1, encoder_layers=[[8, 3, 1], [8, 3, 2], [8, 3, 1]],
                            batch_norm=True)
    assert model.encode(torch.rand(5, 1, 15, 15))[0].shape == (5, 4)
    with pytest.raises(ValueError, match="must divide patch_size"):
        models.PatchVAE(9, 2, 4, 1)
    with pytest.raises(ValueError, match="leaves no output"):
        models.PatchVAE(3, 1, 4, 1, encoder_layers=[[8, 5, 1]])
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 15, 15\)"):
        model.loss(torch.rand(5, 1, 9, 9))
    with pytest.raises(TypeError, match="floating"):
        models.VAE(3, 1, 8).encode(torch.ones(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size"):
        models.VAE(3, 1, 0)
    with pytest.raises(ValueError, match="unknown model name"):
        models.build_model({"name": "NoSuchVAE"})


def _gather_worker(rank, world, init_file, z, mu, logvar, results):
    import torch.distributed as dist

    from pyvae._distributed import gather_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    rows = z.shape[0] // world
    local = [t[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
             for t in (z, mu, logvar)]
    (gz, gmu, glv), start = gather_batch(*local)
    terms = kl_decomposition(gz, gmu, glv, 100, estimator="mss")
    mine = slice(start, start + rows)
    (terms.mi[mine] + 2 * terms.tc[mine] + 3 * terms.dim_kl[mine]).sum().backward()
    results[rank] = (terms.tc[mine].detach(), *(t.grad for t in local))
    dist.destroy_process_group()


def test_gather_global_batch_sees_the_whole_batch_with_gradients(tmp_path):
    """Two gloo ranks each holding half the batch give the single-process terms, and the
    summed gradients reach each rank's own rows."""
    import torch.multiprocessing as mp

    z, mu, logvar = (torch.randn(8, 3, dtype=torch.float64) for _ in range(3))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), z, mu, logvar, results),
             nprocs=2, join=True)
    leaves = [t.clone().requires_grad_(True) for t in (z, mu, logvar)]
    terms = kl_decomposition(*leaves, 100, estimator="mss")
    (terms.mi + 2 * terms.tc + 3 * terms.dim_kl).sum().backward()
    for rank in range(2):
        rows = slice(4 * rank, 4 * rank + 4)
        tc, *grads = results[rank]
        torch.testing.assert_close(tc, terms.tc[rows].detach())
        for grad, leaf in zip(grads, leaves):
            torch.testing.assert_close(grad, leaf.grad[rows])

"""pyvae.losses.beta_tcvae against the terms of pyvae.ops.kl_decomposition."""
import pytest
import torch

from pyvae.losses import BetaTCVAELoss, beta_tcvae
from pyvae.ops import kl_decomposition, kl_decomposition_reference


def make_batch(batch=33, dim=6, dtype=torch.float64):
    mu = torch.randn(batch, dim, dtype=dtype)
    logvar = 0.5 * torch.randn(batch, dim, dtype=dtype)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon_nll = torch.rand(batch, dtype=dtype) * 100
    return recon_nll, z, mu, logvar


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_loss_is_the_weighted_sum_of_the_terms(estimator):
    recon_nll, z, mu, logvar = make_batch()
    out = beta_tcvae(recon_nll, z, mu, logvar, 1000, alpha=0.5, beta=4.0, gamma=2.0,
                     estimator=estimator)
    assert isinstance(out, BetaTCVAELoss)
    terms = kl_decomposition_reference(z, mu, logvar, 1000, estimator=estimator)
    expected = (recon_nll + 0.5 * terms.mi + 4.0 * terms.tc + 2.0 * terms.dim_kl).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.mi, terms.mi.mean())
    torch.testing.assert_close(out.tc, terms.tc.mean())
    torch.testing.assert_close(out.dim_kl, terms.dim_kl.mean())
    assert all(value.shape == () for value in out)


def test_defaults_are_beta_tcvae_with_mss():
    recon_nll, z, mu, logvar = make_batch()
    out = beta_tcvae(recon_nll, z, mu, logvar, 500)
    terms = kl_decomposition(z, mu, logvar, 500, estimator="mss")
    torch.testing.assert_close(out.loss,
                               (recon_nll + terms.mi + 6.0 * terms.tc + terms.dim_kl).mean())


def test_equal_weights_give_the_beta_vae_loss():
    # α = β = γ: the three terms sum to log q(z|x) - log p(z), the single-sample KL estimate.
    recon_nll, z, mu, logvar = make_batch()
    out = beta_tcvae(recon_nll, z, mu, logvar, 1000, alpha=3.0, beta=3.0, gamma=3.0)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(0.0, 1.0)
    kl = (posterior.log_prob(z) - prior.log_prob(z)).sum(1)
    torch.testing.assert_close(out.loss, (recon_nll + 3.0 * kl).mean())


def test_gradients_reach_every_input():
    recon_nll, z, mu, logvar = (t.float().requires_grad_() for t in make_batch())
    out = beta_tcvae(recon_nll, z, mu, logvar, 1000)
    grads = torch.autograd.grad(out.loss, (recon_nll, z, mu, logvar))
    torch.testing.assert_close(grads[0], torch.full_like(recon_nll, 1 / recon_nll.numel()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_half_inputs_give_float32_losses():
    recon_nll, z, mu, logvar = (t.to(torch.bfloat16) for t in make_batch(dtype=torch.float32))
    out = beta_tcvae(recon_nll, z, mu, logvar, 1000)
    assert all(value.dtype == torch.float32 for value in out)


def test_bad_inputs():
    recon_nll, z, mu, logvar = make_batch()
    with pytest.raises(ValueError, match=r"recon_nll must be a tensor of shape \(33,\)"):
        beta_tcvae(recon_nll[:, None], z, mu, logvar, 1000)
    with pytest.raises(ValueError, match="recon_nll must be a tensor"):
        beta_tcvae(1.0, z, mu, logvar, 1000)
    with pytest.raises(ValueError, match="estimator must be one of"):
        beta_tcvae(recon_nll, z, mu, logvar, 1000, estimator="naive")
    with pytest.raises(ValueError, match="dataset_size"):
        beta_tcvae(recon_nll, z, mu, logvar, 10)

"""DVAE architecture, presets and the loss (METHOD.md "Architecture" and "Loss")."""
from __future__ import annotations

import pytest
import torch

from purify_pipeline import DVAE, DVAEConfig
from purify_pipeline.dvae.losses import dvae_loss, kl_per_position
from purify_pipeline.dvae.model import DVAEOutput, count_parameters


def test_paper_preset_is_the_authors_setting():
    c = DVAEConfig.preset("paper")
    assert (c.width, c.latent_channels, c.image_size, c.num_classes) == (64, 256, 32, 10)
    assert (c.lr, c.epochs, c.stage2_epochs, c.batch_size, c.grad_clip) == (5e-3, 60, 60, 128, 5.0)
    assert (c.tau1, c.tau2, c.kl_weight, c.energy_start_epoch, c.energy_floor) == (1.0, 3.0, 0.01, 10, 0.002)
    assert c.latent_size == 16 and c.stage1_mode == "sample"


def test_paper_parameter_count():
    m = DVAE(DVAEConfig.preset("paper"))
    n = count_parameters(m)
    assert 1_170_000 < n < 1_195_000, n  # METHOD.md: about 1.18 M, embedding 0.33 M of it
    assert m.class_embedding.numel() == 10 * 128 * 16 * 16
    assert tuple(m.latent_shape) == (256, 16, 16)


@pytest.mark.parametrize("size,grid", [(32, 16), (64, 16), (224, 14)])
def test_output_shapes(size, grid):
    cfg = DVAEConfig.preset("tiny", image_size=size, num_classes=3)
    m = DVAE(cfg)
    x, y = torch.rand(2, 3, size, size), torch.tensor([0, 2])
    out = m(x, y)
    assert out.x_hat.shape == out.p_hat.shape == (2, 3, size, size)
    assert out.mu.shape == out.logvar.shape == (2, cfg.latent_channels, grid, grid)
    assert 0 <= out.x_hat.min() and out.x_hat.max() <= 1
    # the perturbation decoder has no sigmoid: p_hat takes negative values
    assert out.p_hat.min() < 0


def test_every_parameter_gets_a_gradient():
    cfg = DVAEConfig.preset("tiny")
    m = DVAE(cfg)
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    loss, _ = dvae_loss(m(x, y), x, tau=0.0, epoch=11)
    loss.backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_kl_matches_hand_computation():
    mu = torch.zeros(2, 3, 4, 4)
    logvar = torch.zeros(2, 3, 4, 4)
    mu[:, 0] = 1.0  # 0.5 * 1 per position
    logvar[:, 1] = 2.0  # 0.5 * (e^2 - 1 - 2) per position
    want = 0.5 * 1.0 + 0.5 * (torch.exp(torch.tensor(2.0)).item() - 3.0)
    assert kl_per_position(mu, logvar).item() == pytest.approx(want, rel=1e-6)
    # nats per *position*: doubling the grid does not change it, doubling channels does
    assert kl_per_position(mu.repeat(1, 1, 2, 2), logvar.repeat(1, 1, 2, 2)).item() == pytest.approx(want, rel=1e-6)
    assert kl_per_position(mu.repeat(1, 2, 1, 1), logvar.repeat(1, 2, 1, 1)).item() == pytest.approx(2 * want, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampling_and_kl_match_autograd_of_the_reference(dtype):
    """The model's fused z = mu + sigma * eps and KL (one op with its own backward) against autograd through the
    textbook formulas (`kl_per_position`): same values and same gradients for mu and logvar."""
    from purify_pipeline.dvae.model import sample_with_kl

    g = torch.Generator().manual_seed(0)
    mu0 = torch.randn(3, 16, 4, 5, generator=g).to(dtype)
    lv0 = (0.5 * torch.randn(3, 16, 4, 5, generator=g)).to(dtype)
    eps = torch.randn(3, 16, 4, 5, generator=g)
    gz, gkl = torch.randn(3, 16, 4, 5, generator=g), 0.7
    grads = []
    for fused in (True, False):
        mu, lv = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
        if fused:
            z, kl = sample_with_kl(mu, lv, eps)
        else:
            m, v = mu.float(), lv.float()
            z, kl = m + torch.exp(0.5 * v) * eps, kl_per_position(m, v)
        ((z * gz).sum() + gkl * kl).backward()
        grads.append((z.detach(), kl.detach(), mu.grad, lv.grad))
    (z1, kl1, dmu1, dlv1), (z2, kl2, dmu2, dlv2) = grads
    assert z1.dtype == torch.float32 and dmu1.dtype == dtype and dlv1.dtype == dtype
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl1, kl2, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dmu1, dmu2, **tol)
    torch.testing.assert_close(dlv1, dlv2, **tol)


def test_the_model_returns_the_fused_kl_only_when_sampling_with_gradients():
    m = DVAE(DVAEConfig.preset("tiny"))
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    out = m(x, y)
    torch.testing.assert_close(out.kl, kl_per_position(out.mu, out.logvar), rtol=1e-5, atol=1e-5)
    assert m(x, y, sample=False).kl is None
    with torch.no_grad():
        assert m(x, y).kl is None


def _grads_of_rate(kl_scale: float, tau: float) -> torch.Tensor:
    mu = torch.full((2, 8, 4, 4), kl_scale, requires_grad=True)
    logvar = torch.zeros(2, 8, 4, 4)
    x = torch.rand(2, 3, 8, 8)
    out = DVAEOutput(x_hat=x.clone(), p_hat=torch.zeros_like(x), mu=mu, logvar=logvar)
    loss, terms = dvae_loss(out, x, tau=tau, epoch=0)
    loss.backward()
    return mu.grad, terms["kl"].item()


def test_kl_hinge_is_flat_below_tau_and_active_above():
    g, kl = _grads_of_rate(0.1, tau=1.0)  # KL = 8 * 0.5 * 0.01 = 0.04 < 1
    assert kl < 1.0 and torch.count_nonzero(g) == 0
    g, kl = _grads_of_rate(1.0, tau=1.0)  # KL = 4 > 1
    assert kl > 1.0 and torch.all(g > 0)


def test_energy_hinge_only_after_epoch_10():
    x = torch.rand(2, 3, 8, 8)
    p = torch.full_like(x, 0.1, requires_grad=True)
    out = DVAEOutput(x_hat=torch.zeros_like(x), p_hat=p, mu=torch.zeros(2, 4, 2, 2), logvar=torch.zeros(2, 4, 2, 2))
    l10, _ = dvae_loss(out, x, tau=1.0, epoch=10)
    l11, t = dvae_loss(out, x, tau=1.0, epoch=11)
    assert (l11 - l10).item() == pytest.approx(max(0.01, 0.002), rel=1e-5)  # mean(p^2) = 0.01 > floor
    assert t["energy"].item() == pytest.approx(0.01, rel=1e-5)


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="unknown preset"):
        DVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown DVAEConfig fields"):
        DVAEConfig.preset("cpu", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        DVAEConfig(image_size=36, downsample=3)
    c = DVAEConfig.preset("cpu", num_classes=100, tau2=2.5)
    assert DVAEConfig.from_dict(c.to_dict()) == c
    assert c.num_classes == 100 and c.tau2 == 2.5 and c.width == 32


def test_within_class_penalty_is_opt_in_and_measures_image_specific_p_hat():
    from purify_pipeline.dvae.losses import within_class_variance

    assert DVAEConfig.preset("paper").p_class_weight == 0.0  # the paper's loss is unchanged
    y = torch.tensor([0, 0, 1, 1])
    pattern = torch.randn(2, 3, 8, 8)
    assert within_class_variance(pattern[y], y).item() == pytest.approx(0.0, abs=1e-12)  # one pattern per class
    noisy = pattern[y] + torch.tensor([1.0, -1.0, 2.0, -2.0])[:, None, None, None]
    assert within_class_variance(noisy, y).item() == pytest.approx((1 + 1 + 4 + 4) / 4, rel=1e-5)
    x = torch.rand(4, 3, 8, 8)
    out = DVAEOutput(x_hat=x.clone(), p_hat=noisy, mu=torch.zeros(4, 4, 2, 2), logvar=torch.zeros(4, 4, 2, 2))
    base, t0 = dvae_loss(out, x, tau=1.0, epoch=0)
    withp, t1 = dvae_loss(out, x, tau=1.0, epoch=0, y=y, p_class_weight=0.5)
    assert "p_class_var" not in t0 and (withp - base).item() == pytest.approx(0.5 * 2.5, rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        dvae_loss(out, x, tau=1.0, epoch=0, p_class_weight=0.5)
    with pytest.raises(ValueError, match="p_class_weight"):
        DVAEConfig.preset("cpu", p_class_weight=-1.0)


def test_cpu_presets_differ_by_one_documented_step_each() -> None:
    """cpu-v1 -> cpu-v2 (stage 2 at batch 32) -> cpu (tau1 = 0.5); retired trial names are gone."""
    cpu, v2, v1 = (DVAEConfig.preset(n).to_dict() for n in ("cpu", "cpu-v2", "cpu-v1"))
    assert {k for k in v1 if v1[k] != v2[k]} == {"batch_size_stage2", "preset_name"}
    assert {k for k in v2 if v2[k] != cpu[k]} == {"tau1", "preset_name"}
    assert [DVAEConfig.preset("cpu-v1").batch_size_for(s) for s in (1, 2)] == [128, 128]
    assert [DVAEConfig.preset("cpu").batch_size_for(s) for s in (1, 2)] == [128, 32]
    assert [DVAEConfig.preset("cpu").tau(s) for s in (1, 2)] == [0.5, 3.0]
    assert DVAEConfig.preset("paper").tau(1) == DVAEConfig.preset("cpu-v2").tau(1) == 1.0
    assert "cpu-sharp" not in DVAEConfig.presets()
    with pytest.raises(ValueError, match="batch sizes"):
        DVAEConfig.preset("cpu", batch_size_stage2=0)


def test_the_formulas_a_compiled_fit_uses_match_the_fused_op():
    """`sample_with_kl_formulas` (what `train.compiled` hands to torch.compile) computes the fused op's z and KL
    and the same gradients for mu and logvar."""
    from purify_pipeline.dvae.model import sample_with_kl, sample_with_kl_formulas

    g = torch.Generator().manual_seed(1)
    mu0, lv0, eps = (torch.randn(2, 8, 3, 3, generator=g) for _ in range(3))
    gz = torch.randn(2, 8, 3, 3, generator=g)
    res = []
    for fn in (sample_with_kl, sample_with_kl_formulas):
        mu, lv = mu0.clone().requires_grad_(), (0.3 * lv0).requires_grad_()
        z, kl = fn(mu, lv, eps)
        ((z * gz).sum() + 0.7 * kl).backward()
        res.append((z.detach(), kl.detach(), mu.grad, lv.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

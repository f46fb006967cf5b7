import pytest
import torch

from multiteach.losses import CrossEntropy, FeatureHint, KLDistill, cw_margin, kl_divergence, kl_per_sample


def _kl64(s, t, T):
    p_t = torch.softmax(t.double() / T, 1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(s.double() / T, 1))).sum(1)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_reductions_match_float64(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    per_sample = _kl64(s, t, T)
    assert kl_divergence(s, t, T, "batchmean").item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert kl_divergence(s, t, T, "mean").item() == pytest.approx(per_sample.mean().item() / 10, rel=1e-5)
    assert kl_divergence(s, t, T, "sum").item() == pytest.approx(per_sample.sum().item(), rel=1e-5)
    # per sample: each sample's own KL (scaled by 1/C for "mean"), so per-sample weights weigh the right one
    assert kl_per_sample(s, t, T, "batchmean").tolist() == pytest.approx(per_sample.tolist(), rel=1e-5)
    assert kl_per_sample(s, t, T, "mean").tolist() == pytest.approx((per_sample / 10).tolist(), rel=1e-5)


def test_mean_reduction_is_the_official_mtard_kl():
    # zhaoshiji123/MTARD: mean(-log_softmax(S) * softmax(T) + log(softmax(T) + 1e-5) * softmax(T))
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g)
    p = torch.softmax(t.double(), 1)
    official = (-torch.log_softmax(s.double(), 1) * p + torch.log(p + 1e-5) * p).mean().item()
    assert kl_divergence(s, t).item() == pytest.approx(official, rel=1e-3)  # the 1e-5 is the only difference


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # ARD's own reduction, on purpose
def test_ard_kd_is_temperature_squared_elementwise_mean():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    want = 900 * torch.nn.KLDivLoss(reduction="mean")(torch.log_softmax(s / 30, 1), torch.softmax(t / 30, 1))
    got = KLDistill(30.0, "mean", temperature_squared=True)(s, t, None)
    assert got.shape == (8,)
    assert got.mean().item() == pytest.approx(want.item(), rel=1e-4)  # float32 cancellation at T = 30


def test_kl_shape_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="num_classes"):
        kl_divergence(torch.zeros(2, 10), torch.zeros(2, 100))


def test_ce_and_cw_margin():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    assert CrossEntropy()(logits, None, y).tolist() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, reduction="none").tolist())
    assert cw_margin(logits, y).tolist() == pytest.approx([1.0 - 3.0, 5.0 - 2.0])
    assert cw_margin(logits * 100, y, kappa=50).tolist() == pytest.approx([-200.0, 50.0])


def test_feature_hint_is_fitnets_mse_through_a_projector_that_learns():
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(4, 8, 5, 5, generator=g), torch.randn(4, 16, 5, 5, generator=g)
    hint = FeatureHint(8, 16)
    got = hint(fs, ft, None)
    want = ((hint.projector(fs) - ft) ** 2).flatten(1).mean(1)
    assert got.shape == (4,) and torch.allclose(got, want)
    got.mean().backward()
    assert hint.projector.weight.grad is not None and hint.projector.weight.grad.abs().sum() > 0
    assert isinstance(FeatureHint(16, 16).projector, torch.nn.Identity)
    with pytest.raises(ValueError, match="same spatial size"):
        FeatureHint(8, 16)(fs, ft[:, :, :3, :3], None)

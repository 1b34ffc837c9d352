"""SFD's loss (SFD (Pei et al., IJCAI 2021), eq. 10) and the Overhaul / empirical margins, against values computed
here independently."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import integrate, stats

from timm_tffd.losses.margin import EmpiricalMargin, MarginL2Loss, bn_margin, gaussian_margin, margin_l2_loss


def _truncated_mean(m: float, s: float) -> float:
    """E[x | x < 0] for x ~ N(m, s^2), by scipy's truncated normal."""
    s = abs(s)
    return stats.truncnorm(a=-np.inf, b=(0 - m) / s, loc=m, scale=s).mean()


def test_bn_margin_matches_truncated_normal():
    # (beta, gamma): symmetric, mostly positive, mostly negative, negative gamma (|gamma| is the std)
    params = [(0., 1.), (1., 1.), (-1., 2.), (0.5, -0.7), (2.5, 1.)]
    bn = nn.BatchNorm2d(len(params))
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([b for b, _ in params]))
        bn.weight.copy_(torch.tensor([g for _, g in params]))
    got = bn_margin(bn)
    want = torch.tensor([_truncated_mean(b, g) for b, g in params], dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got < 0).all()
    assert got[0].item() == pytest.approx(-np.sqrt(2 / np.pi), rel=1e-6)  # half-normal mean


def test_gaussian_margin_by_numerical_integration():
    m, s = 0.3, 0.8
    pdf = stats.norm(m, s).pdf
    mass = integrate.quad(pdf, -np.inf, 0)[0]
    mean = integrate.quad(lambda x: x * pdf(x), -np.inf, 0)[0] / mass
    assert gaussian_margin(torch.tensor([m]), torch.tensor([s])).item() == pytest.approx(mean, rel=1e-5)


def test_gaussian_margin_fallback_and_zero_std():
    # P(x < 0) = cdf(-4) ~ 3e-5 < 1e-3: the Overhaul code's -3 * std
    assert gaussian_margin(torch.tensor([4.]), torch.tensor([1.])).item() == pytest.approx(-3.)
    # P(x < 0) = cdf(-2.5) ~ 6e-3 >= 1e-3: still the conditional mean
    assert gaussian_margin(torch.tensor([5.]), torch.tensor([2.])).item() == pytest.approx(_truncated_mean(5., 2.))
    # a zero-initialised BN scale: finite (the BN output is the constant beta)
    zero = gaussian_margin(torch.tensor([0.5, -0.5]), torch.tensor([0., 0.]))
    assert torch.isfinite(zero).all()
    assert zero[1].item() == pytest.approx(-0.5) and abs(zero[0].item()) < 1e-6


def _eq10(s, y, m, normalizer):
    """Eq. 10 element by element."""
    total = 0.
    for b, c, i, j in np.ndindex(*s.shape):
        t = max(y[b, c, i, j], m[c])
        if not (s[b, c, i, j] <= t <= 0):
            total += (t - s[b, c, i, j]) ** 2
    return total / (s.shape[0] * normalizer)


@pytest.mark.parametrize('normalizer', [1., 1000.])
def test_loss_matches_elementwise_eq10(normalizer):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 2, 3, generator=g)
    y = torch.randn(3, 4, 2, 3, generator=g) * 2
    m = -torch.rand(4, generator=g)
    want = _eq10(s.double().numpy(), y.double().numpy(), m.double().numpy(), normalizer)
    assert margin_l2_loss(s, y, m, normalizer).item() == pytest.approx(want, rel=1e-5)
    assert MarginL2Loss(normalizer)(s, y, m).item() == pytest.approx(want, rel=1e-5)


def test_loss_keeps_float64_and_lifts_half_to_float32():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) + 1e-9  # detail below float32's resolution
    y = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    m = -torch.rand(3, generator=g, dtype=torch.float64)
    s.requires_grad_()
    got = margin_l2_loss(s, y, m, 1.)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_eq10(s.detach().numpy(), y.numpy(), m.numpy(), 1.), rel=1e-13)
    got.backward()
    t = torch.maximum(y, m.view(1, -1, 1, 1))
    keep = ~((s.detach() <= t) & (t <= 0))
    torch.testing.assert_close(s.grad, 2 * (s.detach() - t) * keep / s.shape[0], rtol=1e-13, atol=0)
    # float16 features (AMP): the squares of differences above 256 are summed in float32
    half = margin_l2_loss(torch.full((1, 1, 1, 1), 300., dtype=torch.float16), torch.zeros(1, 1, 1, 1,
                          dtype=torch.float16), torch.tensor([-1.], dtype=torch.float16), 1.)
    assert half.dtype == torch.float32 and half.item() == 90000.


def test_loss_zero_below_negative_target_positive_otherwise():
    m = torch.tensor([-1.])
    y = torch.full((1, 1, 1, 1), -5.)  # teacher far below the margin: target t = -1
    assert margin_l2_loss(torch.full_like(y, -2.), y, m, 1.).item() == 0  # s <= t <= 0
    assert margin_l2_loss(torch.full_like(y, -1.), y, m, 1.).item() == 0  # s == t
    assert margin_l2_loss(torch.full_like(y, -0.5), y, m, 1.).item() == pytest.approx(0.25)  # s above t
    y_pos = torch.full((1, 1, 1, 1), 2.)  # positive target: always penalised, even from below
    assert margin_l2_loss(torch.full_like(y, -3.), y_pos, m, 1.).item() == pytest.approx(25.)
    assert margin_l2_loss(torch.full_like(y, 3.), y_pos, m, 1.).item() == pytest.approx(1.)


def test_loss_gradient_reaches_student_only():
    s = torch.randn(2, 3, 2, 2, requires_grad=True)
    y = torch.randn(2, 3, 2, 2, requires_grad=True)
    margin_l2_loss(s, y, torch.full((3,), -0.5)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert y.grad is None


def test_loss_bad_input():
    with pytest.raises(ValueError, match='differ in shape'):
        margin_l2_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1), torch.zeros(2))
    with pytest.raises(ValueError, match='normalizer'):
        MarginL2Loss(0)


def test_empirical_margin():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 2, 2, generator=g) for _ in range(2)]
    batches[0][:, 2] = batches[0][:, 2].abs()
    batches[1][:, 2] = batches[1][:, 2].abs()  # channel 2 never negative
    em = EmpiricalMargin(3)
    for b in batches:
        em.update(b)
    x = np.concatenate([b.numpy() for b in batches])
    for c in range(3):
        v = x[:, c].ravel()
        want = v[v < 0].mean() if (v < 0).any() else 0.
        assert em.margin[c].item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert em.margin[2].item() == 0

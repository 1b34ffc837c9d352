"""EMD-l2 local matching: the Sinkhorn solver against the exact assignment, gradients, options and errors."""
import numpy as np
import pytest
import timm
import torch
from scipy.optimize import linear_sum_assignment

from timm_tffd import emd_l2, emd_layer_loss, inter_layer_loss, sinkhorn_plan, wrap


def _points(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).relu()


def _np_descriptors(f, size):
    """NCHW -> (N, H*W, C), average-pooled to size x size by block means."""
    a = f.detach().numpy()
    n, c, h, w = a.shape
    a = a.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))
    return a.reshape(n, c, size * size).transpose(0, 2, 1)


def _np_exact_emd(x, y):
    """Mean over the batch of the optimal assignment's mean squared distance per channel (uniform weights, N = M)."""
    values = []
    for xb, yb in zip(x, y):
        cost = ((xb[:, None, :] - yb[None, :, :]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost)
        values.append(cost[rows, cols].mean() / xb.shape[-1])
    return float(np.mean(values))


def test_sinkhorn_plan_marginals():
    x, y = _points(0, (3, 12, 4)), _points(1, (3, 12, 4))
    plan = sinkhorn_plan(torch.cdist(x, y) ** 2, eps=0.05, iters=300)
    assert plan.dtype == torch.float32 and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.full((3, 12), 1 / 12))  # columns: exact
    torch.testing.assert_close(plan.sum(2), torch.full((3, 12), 1 / 12), rtol=1e-2, atol=0)  # rows: converged


@pytest.mark.parametrize('n', [4, 9, 16])
def test_emd_l2_approaches_exact_assignment(n):
    x, y = _points(2, (3, n, 6)), _points(3, (3, n, 6))
    exact = _np_exact_emd(x.numpy(), y.numpy())
    assert emd_l2(x, y, eps=0.002, iters=1000).mean().item() == pytest.approx(exact, rel=5e-3)
    # the default, coarser eps stays within a few percent
    assert emd_l2(x, y).mean().item() == pytest.approx(exact, rel=5e-2)


def test_emd_layer_loss_aligns_pools_and_matches():
    # shallow 8x8 pooled to the deep map's 4x4, channels cut to the shallow 5, then a 2x2 grid
    shallow, deep = _points(4, (2, 5, 8, 8)), _points(5, (2, 7, 4, 4))
    for grid, size in ((None, 4), (2, 2)):
        want = _np_exact_emd(_np_descriptors(shallow, size), _np_descriptors(deep[:, :5], size))
        got = emd_layer_loss([shallow, deep], grid=grid, eps=0.002, iters=1000).item()
        assert got == pytest.approx(want, rel=5e-3)


def test_emd_is_invariant_to_shuffled_positions():
    # the deep map is the pooled shallow map with its positions shuffled: inter sees a large error, EMD none
    shallow = _points(6, (2, 3, 4, 4))
    pooled = shallow.reshape(2, 3, 2, 2, 2, 2).mean((3, 5)).flatten(2)
    deep = pooled[:, :, torch.tensor([3, 0, 2, 1])].reshape(2, 3, 2, 2)
    assert inter_layer_loss([shallow, deep]).item() > 0.05
    assert emd_layer_loss([shallow, deep]).item() < 1e-3 * inter_layer_loss([shallow, deep]).item()


def test_emd_gradient_is_the_plan_weighted_cost_gradient():
    x, y = _points(7, (2, 9, 4)).float().requires_grad_(), _points(8, (2, 9, 4)).float()
    emd_l2(x, y).sum().backward()
    # independent evaluation: the plan held fixed, the cost matrix built by broadcasting
    xr = x.detach().clone().requires_grad_()
    plan = sinkhorn_plan(torch.cdist(x.detach(), y) ** 2)
    ((plan * ((xr[:, :, None] - y[:, None]) ** 2).sum(-1)).sum((1, 2)) / 4).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)


def test_emd_l2_runs_in_float32_under_autocast():
    x, y = _points(12, (2, 9, 8)).float(), _points(13, (2, 9, 8)).float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = emd_l2(x.bfloat16(), y)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, emd_l2(x.bfloat16().float(), y))


def test_emd_gradients_reach_shallow_side_only():
    feats = [_points(9, s).requires_grad_() for s in ((2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2))]
    emd_layer_loss(feats).backward()
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0
    assert feats[2].grad is None
    feats = [_points(9, s).requires_grad_() for s in ((2, 4, 8, 8), (2, 6, 4, 4))]
    emd_layer_loss(feats, grid=2).backward()
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad is None


@pytest.mark.parametrize('kwargs,match', [
    (dict(grid=3), 'EMD grid 3 is larger than the 2x2 map of stage pair'),
    (dict(grid=0), 'grid must be a positive integer'),
    (dict(grid=2.0), 'grid must be a positive integer'),
    (dict(eps=0.), 'eps must be > 0'),
    (dict(iters=0), 'iters must be a positive integer'),
    (dict(pairs='some'), 'unknown inter-layer pairs'),
])
def test_emd_bad_input(kwargs, match):
    feats = [_points(10, (1, 2, 4, 4)), _points(11, (1, 2, 2, 2))]
    with pytest.raises(ValueError, match=match):
        emd_layer_loss(feats, **kwargs)


def test_emd_bad_options_in_wrap():
    model = timm.create_model('test_resnet', num_classes=5)
    with pytest.raises(ValueError, match='eps must be > 0'):
        wrap(model, 'emd', emd_eps=-1.)
    with pytest.raises(ValueError, match='EMD-l2 matching needs at least two stages'):
        wrap(model, 'emd', stages=[2])
    wrap(model, 'emd', emd_grid=4).train()  # the map sizes are known only in the forward pass
    with pytest.raises(ValueError, match='EMD grid 4 is larger than the 2x2 map'):
        model(torch.randn(2, 3, 32, 32))

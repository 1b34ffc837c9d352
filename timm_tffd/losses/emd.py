"""EMD-l2 local feature matching: deep local descriptors supervise shallow ones up to a matching (SFR (Fan, 2021)).

For a top-down pair (shallow, deep) the two maps are aligned as in inter-layer Tf-FD (the larger map average-pooled to
the smaller size, both cut to the first ``min(C_s, C_d)`` channels, the deep map detached), optionally pooled further
to a ``grid x grid`` map. Each of the ``N = H * W`` positions gives a local descriptor, a C-vector. The two sets, with
uniform weights ``1 / N``, are matched by entropic optimal transport with the ground cost ``||x_i - y_j||^2``; the
pair loss is the transport cost ``sum_ij P_ij ||x_i - y_j||^2 / C``, averaged over the batch.

With the identity plan this is inter-layer's mean squared error, and the optimal plan can only lower it. The plan is a
constant for the gradient (envelope theorem). SFR gives no solver settings; the defaults (``eps=0.02`` relative to the
mean cost, 50 iterations, every position) are this package's, chosen in docs/sfr.md. Solver design: docs/design.md.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .inter import aligned_pairs, inter_layer_pairs

__all__ = ['sinkhorn_plan', 'emd_l2', 'emd_layer_loss', 'check_emd_options']


def check_emd_options(grid: Optional[int], eps: float, iters: int):
    """Raise ``ValueError`` for an invalid ``grid``, ``eps`` or ``iters`` (see ``emd_layer_loss``)."""
    if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
        raise ValueError(f'EMD grid must be a positive integer or None, got {grid!r}')
    if not eps > 0:  # also rejects NaN
        raise ValueError(f'EMD eps must be > 0, got {eps}')
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f'EMD iters must be a positive integer, got {iters!r}')


def _plan(f: torch.Tensor, g: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    # clamped where exp() is still a normal float32: subnormal entries slow the matrix products (docs/design.md)
    return torch.exp((f + g - scaled).clamp_min(-80.))


@torch.no_grad()
def sinkhorn_plan(cost: torch.Tensor, eps: float = 0.02, iters: int = 50) -> torch.Tensor:
    """Entropic optimal transport plans between uniform weights, batched (Sinkhorn, Cuturi 2013).

    Scaling iterations with log stabilization (Schmitzer 2019): the first iteration is in the log domain, and every
    10 iterations the scalings are absorbed into the dual potentials. A fixed iteration count, no host
    synchronization (docs/design.md, "EMD solver").

    Args:
        cost: (B, N, M) ground costs.
        eps: Entropic regularization relative to each problem's mean cost; smaller is closer to the exact EMD and
            converges more slowly.
        iters: Sinkhorn iterations (each updates both marginals).

    Returns:
        (B, N, M) float32 plans; the column sums are ``1 / M`` and the row sums approach ``1 / N``.
    """
    b, n, m = cost.shape
    cost = cost.float()
    scaled = cost / (eps * cost.mean((1, 2), keepdim=True).clamp_min(1e-12))
    tiny = torch.finfo(scaled.dtype).tiny
    # dual potentials in units of eps: f_i = log(1/N) - LSE_j(g_j - C_ij/eps), g_j = log(1/M) - LSE_i(f_i - C_ij/eps)
    f = -math.log(n) - torch.logsumexp(-scaled, dim=2, keepdim=True)
    g = -math.log(m) - torch.logsumexp(f - scaled, dim=1, keepdim=True)
    for start in range(1, iters, 10):
        kernel = _plan(f, g, scaled)
        v = cost.new_ones(b, m, 1)
        for _ in range(min(10, iters - start)):
            u = (1 / n) / torch.bmm(kernel, v).clamp_min(tiny)
            v = (1 / m) / torch.bmm(kernel.transpose(1, 2), u).clamp_min(tiny)
        f = f + u.log()
        g = g + v.log().transpose(1, 2)
    return _plan(f, g, scaled)


def emd_l2(
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float = 0.02,
        iters: int = 50,
) -> torch.Tensor:
    """EMD-l2 between two batches of equally weighted point sets, per sample and per channel.

    Args:
        x: (B, N, C) points.
        y: (B, M, C) points (detach it to make it a fixed target).
        eps: See ``sinkhorn_plan``.
        iters: See ``sinkhorn_plan``.

    Returns:
        (B,) transport costs ``sum_ij P_ij ||x_i - y_j||^2 / C``, computed in float32 (also under autocast).
    """
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        x2, y2 = x.pow(2).sum(-1), y.pow(2).sum(-1)
        with torch.no_grad():
            cost = (x2.unsqueeze(2) + y2.unsqueeze(1)).baddbmm(x, y.transpose(1, 2), alpha=-2).clamp_min(0)
            plan = sinkhorn_plan(cost, eps, iters)
        value = (plan.sum(2) * x2).sum(1) + (plan.sum(1) * y2).sum(1) - 2 * (x * torch.bmm(plan, y)).sum((1, 2))
    return value / x.shape[-1]


def _local_descriptors(f: torch.Tensor, grid: Optional[int]) -> torch.Tensor:
    if grid is not None:
        f = F.adaptive_avg_pool2d(f, grid)
    return f.flatten(2).transpose(1, 2)  # (B, H * W, C)


def emd_layer_loss(
        features: Sequence[torch.Tensor],
        pairs: str = 'all',
        grid: Optional[int] = None,
        eps: float = 0.02,
        iters: int = 50,
) -> torch.Tensor:
    """EMD-l2 local matching loss, the mean over top-down pairs of the batch-mean ``emd_l2``.

    Args:
        features: NCHW maps, shallow to deep.
        pairs: ``'all'`` or ``'adjacent'`` (see ``timm_tffd.losses.inter_layer_pairs``); deep always teaches shallow.
        grid: Pool both aligned maps to ``grid x grid`` positions (fewer positions: cost falls as N^2); ``None``
            keeps the aligned size. Must not exceed the aligned map of any pair.
        eps: See ``sinkhorn_plan``.
        iters: See ``sinkhorn_plan``.
    """
    check_emd_options(grid, eps, iters)
    index_pairs = inter_layer_pairs(len(features), pairs, 'top-down')
    total = 0.
    for s, t, student, target in aligned_pairs(features, index_pairs):
        c = min(student.shape[1], target.shape[1])
        student, target = student[:, :c], target[:, :c]
        if grid is not None and grid > min(student.shape[-2:]):
            raise ValueError(f'EMD grid {grid} is larger than the {student.shape[-2]}x{student.shape[-1]} map of '
                             f'stage pair {(s, t)}; use a grid of at most {min(student.shape[-2:])} or None')
        x, y = _local_descriptors(student, grid), _local_descriptors(target, grid)
        total = total + emd_l2(x, y, eps, iters).mean()
    return total / len(index_pairs)

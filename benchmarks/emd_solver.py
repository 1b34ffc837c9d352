"""EMD-l2 solvers compared: timm_tffd's batched Sinkhorn against POT, on speed and on accuracy against the exact EMD.

Every solver gets the same batches of two equally weighted point sets (B problems of N points in C dimensions, the
local descriptors of a shallow and a deep map) and computes the EMD-l2 loss with its gradient:

* ``tffd``: ``timm_tffd.losses.emd.emd_l2`` (batched, log-stabilized scaling Sinkhorn, fixed iteration count).
* ``pot-batch``: POT's batched log-domain Sinkhorn, ``ot.batch.solve_batch(method='log_sinkhorn', grad='envelope')``,
  same relative eps and iteration count (``tol=0``, so it never stops early; it checks convergence every 10 steps).
* ``pot-loop``: POT's ``ot.sinkhorn(method='sinkhorn_log')``, one problem at a time, same eps and iterations.
* ``pot-emd``: POT's exact network-simplex solver ``ot.emd``, one problem at a time (CPU, float64).
* ``scipy``: ``scipy.optimize.linear_sum_assignment``, the exact reference (uniform weights and N = M make the EMD
  an assignment problem); its cost is what ``error`` is relative to.

Columns: ``ms``: median wall time of forward + backward for the batch (solvers interleaved, after one warm-up);
``error``: mean relative error of the transport cost against the exact EMD; ``marginal``: the largest relative
deviation of a plan's row or column sums from 1 / N.

    python benchmarks/emd_solver.py
    python benchmarks/emd_solver.py --positions 49,196 --batch-size 64 --eps 0.01 --iters 100
"""
import argparse
import statistics
import time
from typing import Callable, Dict, Tuple

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from timm_tffd.losses.emd import emd_l2, sinkhorn_plan

Solver = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def _cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)


def make_solvers(eps: float, iters: int) -> Dict[str, Solver]:
    """name -> solver(x, y) returning (per-sample transport costs / C with gradient, plans or None)."""

    def tffd(x, y):
        return emd_l2(x, y, eps, iters), None  # the plan is recomputed outside the timing

    def pot_batch(x, y):
        cost = ot.batch.dist_batch(x, y, metric='sqeuclidean')
        scale = cost.detach().mean((1, 2), keepdim=True)
        res = ot.batch.solve_batch(cost / scale, reg=eps, max_iter=iters, tol=0., method='log_sinkhorn',
                                   grad='envelope')
        return res.value_linear * scale.flatten() / x.shape[-1], res.plan

    def per_sample(solve):
        def run(x, y):
            values, plans = [], []
            for xb, yb in zip(x, y):
                cost = _cost(xb, yb)
                plan = solve(cost.detach())
                values.append((plan * cost).sum() / x.shape[-1])
                plans.append(plan)
            return torch.stack(values), torch.stack(plans)
        return run

    def pot_loop(cost):
        n, m = cost.shape
        a, b = torch.full((n,), 1 / n), torch.full((m,), 1 / m)
        return ot.sinkhorn(a, b, cost / cost.mean(), eps, method='sinkhorn_log', numItermax=iters, stopThr=0.)

    def pot_emd(cost):
        n, m = cost.shape
        c = cost.double().numpy()
        return torch.from_numpy(ot.emd(np.full(n, 1 / n), np.full(m, 1 / m), c)).float()

    def scipy_assignment(cost):
        n = cost.shape[0]
        rows, cols = linear_sum_assignment(cost.double().numpy())
        plan = torch.zeros_like(cost)
        plan[rows, cols] = 1 / n
        return plan

    return {
        'tffd': tffd,
        'pot-batch': pot_batch,
        'pot-loop': per_sample(pot_loop),
        'pot-emd': per_sample(pot_emd),
        'scipy': per_sample(scipy_assignment),
    }


def make_points(batch_size: int, positions: int, channels: int, seed: int = 0):
    """Non-negative descriptors; the deep side is a noisy, spatially shuffled copy of the shallow side."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, positions, channels, generator=g).relu()
    perm = torch.randperm(positions, generator=g)
    y = (0.6 * x[:, perm] + 0.8 * torch.randn(batch_size, positions, channels, generator=g)).relu()
    return x, y


def run_once(solver: Solver, x: torch.Tensor, y: torch.Tensor):
    xg = x.clone().requires_grad_()
    start = time.perf_counter()
    value, plan = solver(xg, y)
    value.sum().backward()
    return time.perf_counter() - start, value.detach(), plan


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--positions', default='16,49,100,196', help='comma-separated point counts N (= grid^2)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--channels', type=int, default=128)
    parser.add_argument('--eps', type=float, default=0.02, help='entropic eps, relative to the mean cost')
    parser.add_argument('--iters', type=int, default=50)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    solvers = make_solvers(args.eps, args.iters)

    print(f'B={args.batch_size} C={args.channels} eps={args.eps} iters={args.iters} threads={args.threads} '
          f'torch={torch.__version__} POT={ot.__version__}')
    print('| N | solver | ms (fwd+bwd) | error vs exact | marginal |')
    print('| --- | --- | --- | --- | --- |')
    for n in [int(p) for p in args.positions.split(',')]:
        x, y = make_points(args.batch_size, n, args.channels)
        results = {}
        times = {name: [] for name in solvers}
        for _ in range(args.repeats + 1):  # solvers interleaved, so load drift hits all alike; the first is warm-up
            for name, fn in solvers.items():
                dt, value, plan = run_once(fn, x, y)
                times[name].append(dt)
                results[name] = (value, plan)
        exact = results['scipy'][0]
        for name, (value, plan) in results.items():
            ms = statistics.median(times[name][1:]) * 1e3
            if plan is None:
                plan = sinkhorn_plan(_cost(x, y), args.eps, args.iters)
            error = ((value - exact) / exact).mean().item()
            marginal = max((plan.sum(2) * n - 1).abs().max().item(), (plan.sum(1) * n - 1).abs().max().item())
            print(f'| {n} | {name} | {ms:.1f} | {error:+.2e} | {marginal:.1e} |')


if __name__ == '__main__':
    main()

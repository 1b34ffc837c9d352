"""Time of the Tf-FD terms with one piece of timm_tffd as it is and swapped for an earlier form, in one process.

Two source trees in two worker processes (``overhead.py --trees``) differ by a few percent even where they run
identical code (each process places its memory its own way): as much as a piece of the terms weighs. Here one process
times the terms (``benchmarks/terms.py``, configuration ``inter+intra``, on the maps a model taps) with the piece as
the library has it (``current``) and with the earlier form (``earlier``), each twice, interleaved round by round with
the order reversed every other round; the ratio of each run to the first ``current`` is the median of per-round
ratios with a bootstrap 95% interval, and the second run of each form shows what identical code differs by.

Earlier forms (``--swap``):

* ``avg_pool2d``: inter pools with ``F.avg_pool2d`` everywhere, instead of ``inter.block_mean``'s matrix product on
  the CPU;
* ``depthwise-conv``: inter pools a float32 map on the CPU by a depthwise convolution with weights ``1 / (kh * kw)``
  (stride = kernel), the form before the matrix product;
* ``whole-gather``: intra's forward gathers the whole map in partner order and halves the squared norm of
  ``f[:, partner] - f`` (every pair counted twice), instead of gathering the two halves;
* ``advanced-indexing``: intra gathers channels by advanced indexing (``f[:, index]``) on every map, instead of
  ``index_select`` on contiguous maps and ``torch.gather`` along the channels of channels-last maps such as a ViT's
  token views (``intra._channels``).

    python benchmarks/ab_terms.py --swap avg_pool2d --models resnet50,resnet18 --rounds 41
    python benchmarks/ab_terms.py --swap depthwise-conv --models resnet50,resnet18 --rounds 41 --threads 2
    python benchmarks/ab_terms.py --swap whole-gather --rounds 41 --threads 2
    python benchmarks/ab_terms.py --swap advanced-indexing --models resnet50,resnet18 --rounds 81 --threads 2
    python benchmarks/ab_terms.py --swap advanced-indexing --models vit_small_patch16_224 --rounds 81 --threads 2
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from timm_tffd.losses import inter, intra

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: `benchmarks` too
from benchmarks import overhead, terms  # noqa: E402


def _whole_gather_forward(ctx, f, salient, redundant, partner, learns):
    ctx.save_for_backward(f, partner, learns)
    d = f[:, partner].sub_(f)  # each channel's partner minus the channel: every pair twice
    total = torch.linalg.vector_norm(d, dtype=intra.accumulation_dtype(f.dtype)).square()
    return total / (2 * intra._pair_count(f))


def _conv_block_mean(x, kernel):
    if x.device.type != 'cpu' or x.dtype != torch.float32:
        return F.avg_pool2d(x, kernel)
    weight = x.new_full((x.shape[1], 1) + tuple(kernel), 1. / (kernel[0] * kernel[1]))
    with torch.autocast('cpu', enabled=False):
        return F.conv2d(x, weight, stride=kernel, groups=x.shape[1])


# name -> (object, attribute, earlier form)
SWAPS = {
    'avg_pool2d': (inter, 'block_mean', lambda x, kernel: F.avg_pool2d(x, kernel)),
    'depthwise-conv': (inter, 'block_mean', _conv_block_mean),
    'whole-gather': (intra._PartnerMSE, 'forward', staticmethod(_whole_gather_forward)),
    'advanced-indexing': (intra, '_channels', lambda f, index: f[:, index]),
}
RUNS = ('current', 'earlier', 'current#2', 'earlier#2')


def measure(model_name: str, swap: str, args) -> dict:
    """Median ms of each run and its per-round ratio to ``current``, with the 95% interval."""
    owner, attr, earlier = SWAPS[swap]
    current = vars(owner)[attr]
    step = terms.make_step('inter+intra', terms.Tapped(model_name, args.batch_size, args.img_size))

    def run(name: str):
        def swapped_step():
            setattr(owner, attr, current if name.startswith('current') else earlier)
            step()
        return overhead.timed(swapped_step)

    try:
        times = overhead.interleaved_rounds({name: run(name) for name in RUNS}, args.rounds, args.warmup)
    finally:
        setattr(owner, attr, current)
    out = {}
    for name in RUNS:
        ratios = [a / b for a, b in zip(times[name], times['current'])]
        out[name] = {'ms': 1e3 * statistics.median(times[name]), 'ratio': statistics.median(ratios),
                     'ratio_ci95': overhead.median_interval(ratios)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--swap', required=True, choices=tuple(SWAPS))
    parser.add_argument('--models', default=','.join(overhead.DEFAULT_MODELS))
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=41)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s own choice)')
    overhead.add_malloc_argument(parser)
    args = parser.parse_args()
    setup = overhead.single_process_timing(args.threads, args.malloc)
    print(f'torch {torch.__version__}, {setup}, batch {args.batch_size}, {args.img_size} px, {args.rounds} rounds, '
          f'swap {args.swap}\n')
    print('| model | run | terms time (ms) | vs current | 95% interval |\n|---|---|---:|---:|---:|')
    for model_name in args.models.split(','):
        res = measure(model_name, args.swap, args)
        for name, r in res.items():
            lo, hi = r['ratio_ci95']
            print(f'| {model_name} | {name} | {r["ms"]:.1f} | {r["ratio"]:.3f} | [{lo:.3f}, {hi:.3f}] |', flush=True)


if __name__ == '__main__':
    main()

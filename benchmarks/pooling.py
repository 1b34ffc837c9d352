"""Time of inter's pooling alone (forward, backward) in each of its forms, on the maps a ResNet's taps pool, CPU.

Forms: ``avg_pool2d`` (ATen's kernels), ``depthwise-conv`` (oneDNN's depthwise convolution with weights
``1 / (kh * kw)``, the library's form before), ``product`` (the matrix product, forced on every block and width),
``block_mean`` (the library's choice between the product and ``avg_pool2d``: ``timm_tffd.losses.inter``). Each
shape runs every form round after round, in turn (the order rotated every round), on one map and one upstream
gradient; the table gives median milliseconds of the forward and of the backward, and the largest difference of each
form's values from ``avg_pool2d``'s. A micro-benchmark: what the pooling costs inside the terms is
``ab_terms.py``'s to say (``--swap avg_pool2d``, ``--swap depthwise-conv``).

    python benchmarks/pooling.py --threads 2
    python benchmarks/pooling.py --shapes 16x256x56x56/2,16x24x112x112/4 --rounds 21
"""
import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from timm_tffd.losses.inter import _block_mean_by_product, block_mean

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: `benchmarks` too
from benchmarks import overhead  # noqa: E402
from benchmarks.ab_terms import _conv_block_mean  # noqa: E402

FORMS = {
    'avg_pool2d': lambda x, kernel: F.avg_pool2d(x, kernel),
    'depthwise-conv': _conv_block_mean,
    'product': _block_mean_by_product,
    'block_mean': block_mean,
}
# resnet50's and resnet18's maps at batch 16, 224 px, and the 2 x 2 pooling of each to the next stage's size; then
# larger blocks and a 112 x 112 map
DEFAULT_SHAPES = ('16x256x56x56/2', '16x512x28x28/2', '16x1024x14x14/2', '16x64x56x56/2', '16x128x28x28/2',
                  '16x64x112x112/2', '16x128x28x28/4', '16x64x56x56/8')


def parse_shape(text: str) -> Tuple[Tuple[int, ...], Tuple[int, int]]:
    """``'16x256x56x56/2'`` -> ``((16, 256, 56, 56), (2, 2))``."""
    dims, k = text.split('/')
    return tuple(int(d) for d in dims.split('x')), (int(k), int(k))


def measure(shape: Tuple[int, ...], kernel: Tuple[int, int], rounds: int, warmup: int = 2) -> Dict[str, dict]:
    """Median forward and backward milliseconds of each form, and the largest difference of its values from
    ``avg_pool2d``'s."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).relu_().requires_grad_()
    want = F.avg_pool2d(x.detach(), kernel)
    upstream = torch.randn(want.shape, generator=g)
    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in FORMS}
    names = list(FORMS)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = FORMS[name]
            t0 = time.perf_counter()
            y = fn(x, kernel)
            t1 = time.perf_counter()
            torch.autograd.grad(y, x, upstream)
            t2 = time.perf_counter()
            if r >= warmup:
                times[name].append((t1 - t0, t2 - t1))
    out = {}
    for name, fn in FORMS.items():
        with torch.no_grad():
            diff = (fn(x, kernel) - want).abs().max().item()
        out[name] = {'forward_ms': 1e3 * statistics.median(t[0] for t in times[name]),
                     'backward_ms': 1e3 * statistics.median(t[1] for t in times[name]), 'max_abs_diff': diff}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', default=','.join(DEFAULT_SHAPES), help='NxCxHxW/k, comma separated')
    parser.add_argument('--rounds', type=int, default=11)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s own choice)')
    overhead.add_malloc_argument(parser)
    args = parser.parse_args()
    setup = overhead.single_process_timing(args.threads, args.malloc)
    print(f'torch {torch.__version__}, {setup}, {args.rounds} rounds\n')
    print('| map | block | ' + ' | '.join(f'{n} fwd + bwd (ms)' for n in FORMS) + ' | largest difference |')
    print('|---|---|' + '---:|' * (len(FORMS) + 1))
    for text in args.shapes.split(','):
        shape, kernel = parse_shape(text)
        res = measure(shape, kernel, args.rounds)
        cells = ' | '.join(f'{r["forward_ms"]:.1f} + {r["backward_ms"]:.1f}' for r in res.values())
        diff = max(r['max_abs_diff'] for r in res.values())
        print(f'| {"x".join(map(str, shape))} | {kernel[0]}x{kernel[1]} | {cells} | {diff:.1e} |', flush=True)


if __name__ == '__main__':
    main()

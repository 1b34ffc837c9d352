"""Inter-layer Tf-FD: deep stage outputs supervise shallow ones (seed 000, seed 001).

For a pair (student, target) the larger map is average-pooled to the smaller one's spatial size, both are cut to their
first ``min(C_s, C_t)`` channels, the target is detached, and the pair loss is the mean squared error. The layer loss
is the mean over pairs. This is the reference code's ``tfd`` mode; the pooling there is ``avg_pool2d`` with kernel =
stride = size ratio, which ``adaptive_avg_pool2d`` equals whenever the ratio is an integer and which it generalizes
to the odd sizes that timm models produce at arbitrary input resolutions.
"""
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['inter_layer_loss', 'inter_layer_pairs', 'aligned_pairs', 'PAIRS', 'DIRECTIONS']

PAIRS = ('all', 'adjacent')
DIRECTIONS = ('top-down', 'bottom-up', 'bidirectional')


def inter_layer_pairs(num_stages: int, pairs: str = 'all', direction: str = 'top-down') -> List[Tuple[int, int]]:
    """(student, target) index pairs over ``num_stages`` features ordered shallow to deep.

    Args:
        num_stages: Number of features.
        pairs: ``'all'``: every i < j (the reference code); ``'adjacent'``: j = i + 1 only (seed 003, ImageNet).
        direction: ``'top-down'``: deep teaches shallow (default); ``'bottom-up'``: shallow teaches deep;
            ``'bidirectional'``: both (the three variants of seed 001's ablation).
    """
    if pairs not in PAIRS:
        raise ValueError(f'unknown inter-layer pairs {pairs!r}; choose from {", ".join(PAIRS)}')
    if direction not in DIRECTIONS:
        raise ValueError(f'unknown inter-layer direction {direction!r}; choose from {", ".join(DIRECTIONS)}')
    if num_stages < 2:
        raise ValueError(f'inter-layer Tf-FD needs at least two stages, got {num_stages}')
    if pairs == 'all':
        shallow_deep = [(i, j) for i in range(num_stages) for j in range(i + 1, num_stages)]
    else:
        shallow_deep = [(i, i + 1) for i in range(num_stages - 1)]
    out = []
    if direction in ('top-down', 'bidirectional'):
        out += shallow_deep
    if direction in ('bottom-up', 'bidirectional'):
        out += [(j, i) for i, j in shallow_deep]
    return out


def _avg_pool(x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """Average pooling with kernel = stride, as a depthwise convolution (oneDNN's depthwise kernel is about 3x faster
    on CPU than ``avg_pool2d`` on the large shallow maps Tf-FD pools; the result is the same)."""
    weight = x.new_full((x.shape[1], 1) + tuple(kernel), 1. / (kernel[0] * kernel[1]))
    return F.conv2d(x, weight, stride=kernel, groups=x.shape[1])


class _AvgPool(torch.autograd.Function):
    """``_avg_pool`` whose backward is one broadcast copy (faster than both ``avg_pool2d``'s and the convolution's
    backward on CPU)."""

    @staticmethod
    def forward(ctx, x, kernel: Tuple[int, int]):
        ctx.kernel = kernel
        return _avg_pool(x, kernel)

    @staticmethod
    def backward(ctx, grad):
        kh, kw = ctx.kernel
        b, c, h, w = grad.shape
        grad = (grad / (kh * kw)).view(b, c, h, 1, w, 1).expand(b, c, h, kh, w, kw)
        return grad.reshape(b, c, h * kh, w * kw), None


class _Pooler:
    """Average-pools one map to several sizes, each from the smallest already pooled map it divides.

    Average pooling over equal blocks composes exactly, so ``56 -> 28 -> 14 -> 7`` equals pooling 56 -> 7 directly;
    the full-size map is read (and its gradient written) once instead of once per deeper stage.
    """

    def __init__(self, x: torch.Tensor):
        self.maps = {tuple(x.shape[-2:]): x}

    def __call__(self, size: Tuple[int, int]) -> torch.Tensor:
        if size in self.maps:
            return self.maps[size]
        sources = [s for s in self.maps if s[0] % size[0] == 0 and s[1] % size[1] == 0 and s[0] >= size[0]]
        if sources:
            src = min(sources)
            kernel = (src[0] // size[0], src[1] // size[1])
            x = self.maps[src]
            out = _AvgPool.apply(x, kernel) if x.requires_grad else _avg_pool(x, kernel)
        else:  # not an integer ratio: adaptive pooling from the original map
            out = F.adaptive_avg_pool2d(self.maps[max(self.maps)], size)
        self.maps[size] = out
        return out


def aligned_pairs(
        features: Sequence[torch.Tensor],
        index_pairs: Sequence[Tuple[int, int]],
) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(s, t, student, target)`` for each (student, target) index pair: both maps average-pooled to the
    smaller spatial size of the two, the target detached. Channels are left as they are. Every map is pooled at most
    once per size, from the smallest already pooled map of it that the size divides, across all pairs."""
    students: Dict[int, _Pooler] = {}
    targets: Dict[int, _Pooler] = {}
    for s, t in index_pairs:
        fs, ft = features[s], features[t]
        size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        if s not in students:
            students[s] = _Pooler(fs)
        if t not in targets:
            targets[t] = _Pooler(ft.detach())
        yield s, t, students[s](size), targets[t](size)


def inter_layer_loss(
        features: Sequence[torch.Tensor],
        pairs: str = 'all',
        direction: str = 'top-down',
) -> torch.Tensor:
    """Inter-layer Tf-FD loss, the mean over pairs of ``mse(pool(f_s)[:, :C], f_t[:, :C].detach())``.

    Args:
        features: NCHW maps, shallow to deep.
        pairs: ``'all'`` or ``'adjacent'`` (see ``inter_layer_pairs``).
        direction: ``'top-down'``, ``'bottom-up'`` or ``'bidirectional'``.
    """
    index_pairs = inter_layer_pairs(len(features), pairs, direction)
    total = 0.
    for _, _, student, target in aligned_pairs(features, index_pairs):
        c = min(student.shape[1], target.shape[1])
        total = total + F.mse_loss(student[:, :c], target[:, :c])
    return total / len(index_pairs)

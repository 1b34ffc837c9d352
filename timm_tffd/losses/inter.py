"""Inter-layer Tf-FD: deep stage outputs supervise shallow ones (seed 000, seed 001).

For a pair (student, target) the larger map is average-pooled to the smaller one's spatial size, both are cut to their
first ``min(C_s, C_t)`` channels, the target is detached, and the pair loss is the mean squared error. The layer loss
is the mean over pairs. This is the reference code's ``tfd`` mode; the pooling there is ``avg_pool2d`` with kernel =
stride = size ratio, which ``adaptive_avg_pool2d`` equals whenever the ratio is an integer and which it generalizes
to the odd sizes that timm models produce at arbitrary input resolutions.

Isotropic models (ViT, DeiT, ConvMixer...) tap many maps of one shape, and with ``pairs='all'`` the pair count grows as
L(L-1)/2 (66 for a 12-block ViT). A run of consecutive equal-shape maps is therefore handled in O(L): over the pairs
of a run, with m the mean of the run's maps,

    sum_{i<j} ||f_i - f_j||^2 = L * sum_i ||f_i - m||^2

(the value, without cancellation), and the gradient reaching the student f_i is ``2 (n_i f_i - S_i) / N``, where S_i
is the sum of its n_i targets: a suffix sum (top-down), a prefix sum (bottom-up) or the sum of all others
(bidirectional). Both are computed with running sums; the result equals the pairwise form (tested against it).
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .sink import GradLayout, backward_slot as _backward_slot, sink_slot

__all__ = ['inter_layer_loss', 'inter_layer_pairs', 'aligned_pairs', 'equal_shape_runs', 'split_run_pairs',
           'run_pair_mse', 'PAIRS', 'DIRECTIONS']

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


_CHUNK_NUMEL = 1 << 20  # elements per temporary in _AvgPool's backward


def _avg_pool(x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """Average pooling with kernel = stride. Kernels of up to 4 elements (the 2x2 between the stages of a CNN, which
    ``_Pooler`` composes into larger ratios) sum strided views: no temporary as large as ``x`` (oneDNN's depthwise
    convolution reorders the whole map first), and faster than ``avg_pool2d`` on CPU. Other kernels run as
    a depthwise convolution. The result is the same."""
    kh, kw = kernel
    if 1 < kh * kw <= 4:
        parts = [x[:, :, i::kh, j::kw] for i in range(kh) for j in range(kw)]
        out = parts[0] + parts[1]
        for part in parts[2:]:
            out += part
        return out.mul_(1. / len(parts))
    weight = x.new_full((x.shape[1], 1) + tuple(kernel), 1. / (kh * kw))
    return F.conv2d(x, weight, stride=kernel, groups=x.shape[1])


class _AvgPool(torch.autograd.Function):
    """``_avg_pool`` whose backward is one broadcast copy into the gradient (faster than both ``avg_pool2d``'s and the
    convolution's backward on CPU), or a broadcast add into the map's shared buffer when ``x`` comes from
    ``sink_features``; on contiguous maps the broadcast runs along whole rows."""

    @staticmethod
    def forward(ctx, x, kernel: Tuple[int, int]):
        ctx.kernel = kernel
        ctx.slot = sink_slot(x)
        ctx.layout = GradLayout(x)
        return _avg_pool(x, kernel)

    @staticmethod
    def backward(ctx, grad):
        kh, kw = ctx.kernel
        b, c, h, w = grad.shape
        src = (grad * (1. / (kh * kw)))[:, :, :, None, :, None]
        slot = _backward_slot(ctx.slot)
        if slot is not None:
            sink, index = slot
            out, fresh = sink.claim(index)
        else:
            out, fresh = ctx.layout.new()[1], True
        write = torch.Tensor.copy_ if fresh else torch.Tensor.add_
        if out.is_contiguous():
            # each value repeated kw times along a row, then written to the kh rows of its block: the inner loop runs
            # along whole contiguous rows (a broadcast over the 6-d block view has an inner loop of kw elements and is
            # about twice slower). The repeated rows are made a few samples at a time (small reused temporaries).
            rows = out.unflatten(2, (h, kh))  # (b, c, h, kh, W)
            step = max(1, _CHUNK_NUMEL // (c * h * w * kw))
            for i in range(0, b, step):
                part = src[i:i + step, :, :, 0]  # (n, c, h, w, 1)
                wide = part.expand(part.shape[:-1] + (kw,)).flatten(3)[:, :, :, None, :]  # (n, c, h, 1, W)
                write(rows[i:i + step], wide)
        else:
            write(out.unflatten(3, (w, kw)).unflatten(2, (h, kh)), src)  # (b, c, h, kh, w, kw), a view of out
        return (None if slot is not None else out), None


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


def equal_shape_runs(features: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    """``[start, end)`` of each maximal run of at least two consecutive maps with the same shape and dtype."""
    runs = []
    start = 0
    for i in range(1, len(features) + 1):
        if i == len(features) or features[i].shape != features[start].shape \
                or features[i].dtype != features[start].dtype:
            if i - start >= 2:
                runs.append((start, i))
            start = i
    return runs


def split_run_pairs(
        features: Sequence[torch.Tensor],
        index_pairs: Sequence[Tuple[int, int]],
) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Split ``index_pairs`` (every pair i != j of each run must be in it, e.g. ``pairs='all'``) into the equal-shape
    runs that ``run_pair_mse`` covers and the pairs left over."""
    runs = equal_shape_runs(features)
    if not runs:
        return [], list(index_pairs)

    def in_run(s, t):
        return any(a <= s < b and a <= t < b for a, b in runs)
    return runs, [p for p in index_pairs if not in_run(*p)]


def _zeros(like: torch.Tensor) -> torch.Tensor:
    """An accumulator for sums of maps like ``like``: float32 at least (float16/bfloat16 maps under AMP), in the
    maps' own memory layout (channels last for token views), so that every sum and difference with them, and the
    gradients made from it, run over contiguous memory (mixing layouts is several times slower on CPU)."""
    return torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32),
                            memory_format=torch.preserve_format)


def _emit_grad(slot, f: torch.Tensor, neg_sum: torch.Tensor, coef: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient ``neg_sum + coef * f`` of map ``f``: written or added into the map's sink buffer when it comes from
    ``sink_features`` (then None is returned), else returned in ``f``'s dtype."""
    slot = _backward_slot(slot)
    if slot is None:
        return torch.addcmul(neg_sum, f, coef).to(f.dtype)
    buf, fresh = slot[0].claim(slot[1])
    if fresh:
        torch.addcmul(neg_sum, f, coef, out=buf)
    else:
        buf.add_(neg_sum).addcmul_(f, coef)
    return None


class _RunMSE(torch.autograd.Function):
    """Sum over the (student, target) pairs of a run of equal-shape maps of ``mse(f_s, f_t.detach())``, in O(L)."""

    @staticmethod
    def forward(ctx, direction: str, *feats):
        ctx.direction = direction
        ctx.slots = [sink_slot(f) for f in feats]
        ctx.save_for_backward(*feats)
        mean = _zeros(feats[0])
        for f in feats:
            mean.add_(f)
        mean.div_(len(feats))
        spread = sum(torch.sub(f, mean).square_().sum() for f in feats)  # sum_i ||f_i - m||^2, float32 at least
        pairs_sum = len(feats) * spread * (2 if direction == 'bidirectional' else 1)
        return pairs_sum / feats[0].numel()

    @staticmethod
    def backward(ctx, grad):
        # student i with n_i targets summing to S_i: gradient s (n_i f_i - S_i), s = 2 grad / numel; the running sum
        # is kept as -s S so that each gradient is one addcmul
        feats = ctx.saved_tensors
        n = len(feats)
        scale = grad * (2. / feats[0].numel())
        grads = [None] * n
        neg_sum, neg_scale = _zeros(feats[0]), -scale
        if ctx.direction == 'bidirectional':
            for f in feats:
                neg_sum.addcmul_(f, neg_scale)
            for i, f in enumerate(feats):
                if ctx.needs_input_grad[1 + i]:
                    grads[i] = _emit_grad(ctx.slots[i], f, neg_sum, n * scale)
            return (None,) + tuple(grads)
        order = range(n - 1, -1, -1) if ctx.direction == 'top-down' else range(n)
        for count, i in enumerate(order):  # count = targets of student i seen so far (deeper / shallower maps)
            f = feats[i]
            if ctx.needs_input_grad[1 + i] and count:  # the deepest (top-down) map is only a target: no gradient
                grads[i] = _emit_grad(ctx.slots[i], f, neg_sum, count * scale)
            neg_sum.addcmul_(f, neg_scale)
        return (None,) + tuple(grads)


def run_pair_mse(features: Sequence[torch.Tensor], direction: str = 'top-down') -> torch.Tensor:
    """Sum over all (student, target) pairs of equal-shape ``features`` in ``direction`` of ``mse(f_s, f_t.detach())``
    (see the module docstring), a scalar of float32 or wider."""
    if direction not in DIRECTIONS:
        raise ValueError(f'unknown inter-layer direction {direction!r}; choose from {", ".join(DIRECTIONS)}')
    return _RunMSE.apply(direction, *features)


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
    rest = index_pairs
    if pairs == 'all':
        runs, rest = split_run_pairs(features, index_pairs)
        for a, b in runs:
            total = total + run_pair_mse(features[a:b], direction)
    for _, _, student, target in aligned_pairs(features, rest):
        c = min(student.shape[1], target.shape[1])
        total = total + F.mse_loss(student[:, :c], target[:, :c])
    return total / len(index_pairs)

"""Inter-layer Tf-FD: deep stage outputs supervise shallow ones (Tf-FD (Li, ECCV 2022); TFD (Li et al., IJCNN 2022)).

For a pair (student, target) the larger map is average-pooled to the smaller one's spatial size, both are cut to their
first ``min(C_s, C_t)`` channels, the target is detached, and the pair loss is the mean squared error. The layer loss
is the mean over pairs. This is the reference code's ``tfd`` mode (Teacher-free-Distillation, train_kd.py); the
pooling there is ``avg_pool2d`` with kernel = stride = size ratio, which ``adaptive_avg_pool2d`` equals whenever the
ratio is an integer and which it generalizes to the odd sizes that timm models produce at arbitrary input resolutions.

A run of consecutive equal-shape maps (the blocks of an isotropic model: ViT, DeiT, ConvMixer...) with
``pairs='all'`` is summed in O(L) instead of over its L(L-1)/2 pairs, one map at a time as the maps are tapped (see
``RunSum``): the value around the running mean, the gradients through running sums of the maps, so that the
gradient reaching student i, ``2 (n_i f_i - S_i) / N`` (``S_i``: the sum of its n_i targets), is formed when the
backward pass reaches it.
"""
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .saliency import accumulation_dtype

__all__ = ['inter_layer_loss', 'inter_layer_pairs', 'aligned_pairs', 'block_mean', 'equal_shape_runs',
           'split_run_pairs', 'run_pair_mse', 'RunSum', 'inter_stage', 'inter_from_stages', 'InterStage', 'PAIRS',
           'DIRECTIONS']

PAIRS = ('all', 'adjacent')
DIRECTIONS = ('top-down', 'bottom-up', 'bidirectional')


def inter_layer_pairs(num_stages: int, pairs: str = 'all', direction: str = 'top-down') -> List[Tuple[int, int]]:
    """(student, target) index pairs over ``num_stages`` features ordered shallow to deep.

    Args:
        num_stages: Number of features.
        pairs: ``'all'``: every i < j (the reference code); ``'adjacent'``: j = i + 1 only (the Tf-FD
            supplementary, ImageNet).
        direction: ``'top-down'``: deep teaches shallow (default); ``'bottom-up'``: shallow teaches deep;
            ``'bidirectional'``: both (the three variants of the ablation in TFD (Li et al., IJCNN 2022)).
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


def _block_mean_by_product(x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """The block means of a contiguous NCHW map whose size ``kernel`` divides, by one matrix product: each ``kh``
    consecutive rows, ``kh * W`` contiguous values, times a ``(kh * W, W / kw)`` matrix holding ``1 / (kh * kw)``
    where a value falls in an output's block. Same values as ``avg_pool2d`` within float32 rounding for finite maps
    (a non-finite value makes its whole row group non-finite, where ``avg_pool2d`` keeps it to its block)."""
    kh, kw = kernel
    n, c, h, w = x.shape
    block = torch.arange(kh * w, device=x.device) % w // kw  # the output column of each value of kh rows
    weight = (block[:, None] == torch.arange(w // kw, device=x.device)).to(x.dtype) / (kh * kw)
    with torch.autocast(x.device.type, enabled=False):  # in the map's dtype, as avg_pool2d would be
        return (x.view(n * c * (h // kh), kh * w) @ weight).view(n, c, h // kh, w // kw)


def block_mean(x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """``F.avg_pool2d(x, kernel)`` (stride = kernel) of an NCHW map. Eager on the CPU, a contiguous float32 map at
    most 128 wide whose size the kernel divides, pooled by blocks of at most 2 x 2 (every step of a ResNet's
    56 -> 28 -> 14 -> 7 chain at 224 px), is pooled by one matrix product instead (``_block_mean_by_product``; its
    backward is one product too): on resnet50's terms the pooling takes about 17 ms less per step than with ATen's
    pooling kernels or a depthwise convolution, most of it on its 51 MB layer1 map; on resnet18's about as long as
    the convolution and about 6 ms less than ATen's kernels (docs/design.md, "Pooling"). Larger blocks and wider
    maps keep ``avg_pool2d`` (the product's work per output grows with the map's width), as do compiled code
    (inductor fuses the pooling), other devices, dtypes and layouts."""
    kh, kw = kernel
    if x.device.type != 'cpu' or x.dtype != torch.float32 or torch.compiler.is_compiling() or x.dim() != 4 \
            or not x.is_contiguous() or kh > 2 or kw > 2 or x.shape[-1] > 128 \
            or x.shape[-2] % kh or x.shape[-1] % kw:
        return F.avg_pool2d(x, kernel)
    return _block_mean_by_product(x, kernel)


class _Pooler:
    """Average-pools one map to several sizes.

    A size that divides the map's size, or the size of a map pooled from it by equal blocks, is pooled from the
    smallest such map (pooling over equal blocks composes exactly: ``56 -> 28 -> 14 -> 7`` equals ``56 -> 7``). Any
    other size is pooled adaptively from the map itself, and that result is never pooled further (adaptive pooling
    does not compose: 19 -> 10 -> 5 is not 19 -> 5).
    """

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.exact = {tuple(x.shape[-2:]): x}  # the map and the maps block-pooled from it, by size
        self.adaptive = {}

    def __call__(self, size: Tuple[int, int]) -> torch.Tensor:
        if size in self.exact:
            return self.exact[size]
        sources = [s for s in self.exact if s[0] % size[0] == 0 and s[1] % size[1] == 0]
        if sources:
            src = min(sources, key=lambda hw: hw[0] * hw[1])
            kernel = (src[0] // size[0], src[1] // size[1])
            self.exact[size] = block_mean(self.exact[src], kernel)
            return self.exact[size]
        if size not in self.adaptive:
            self.adaptive[size] = F.adaptive_avg_pool2d(self.x, size)
        return self.adaptive[size]


def aligned_pairs(
        features: Sequence[torch.Tensor],
        index_pairs: Sequence[Tuple[int, int]],
) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(s, t, student, target)`` for each (student, target) index pair: both maps average-pooled to the
    smaller spatial size of the two, the target detached. Channels are left as they are. Every map is pooled at most
    once per size across all pairs (see ``_Pooler``)."""
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


class RunSum:
    """The sum over the (student, target) pairs of a run of equal-shape maps of ``||f_s - f_t.detach()||^2``, built
    one map at a time (``add``), in O(L), through plain autograd.

    With ``P`` and ``Q`` the sum of the k maps before ``f_k`` and of their squared norms, the pairs ``f_k`` makes with
    them sum to ``Q - 2 <P, f_k> + k ||f_k||^2``. The gradients come from that form: top-down, ``f_k`` is the detached
    target and ``P``, ``Q`` carry the students' gradients; bottom-up the reverse. Top-down, the products save only the
    maps (kept by the network anyway), and the gradient of student i, ``2 (n_i f_i - S_i)`` (``S_i``: the sum of its
    n_i targets), reaches it down the chains of sums when the backward pass gets there: nothing full-size waits from
    the start of the backward. Bottom-up, each inner product saves its ``P``. The value is the same sum taken around
    the mean ``m = P / k``, where no large terms cancel: ``W + k ||f_k - m||^2``, with ``W`` the earlier maps' spread
    around ``m``, which then grows by ``k / (k + 1) ||f_k - m||^2`` (Welford's update).
    """

    def __init__(self, direction: str = 'top-down'):
        if direction not in DIRECTIONS:
            raise ValueError(f'unknown inter-layer direction {direction!r}; choose from {", ".join(DIRECTIONS)}')
        self.top_down = direction in ('top-down', 'bidirectional')
        self.bottom_up = direction in ('bottom-up', 'bidirectional')
        self.count = 0
        self.maps = None  # P, float32 or wider
        self.squares = None  # Q (top-down)
        self.spread = None  # W
        self.value = None  # the pair sum so far, without gradients
        self.half_form = None  # half the expanded pair sum so far, for its gradients only

    def add(self, f: torch.Tensor):
        """Add the next (deeper) map of the run."""
        k, fd = self.count, f.detach()
        self.count += 1
        # ||f||^2 as <f, f.detach()>: its gradient is f, half the square's; the product is float32 or wider (float16
        # squares overflow above 65504) and saves only the map
        square = (f.to(accumulation_dtype(f.dtype)) * fd).sum()
        if k == 0:
            self.maps, self.squares = f.to(square.dtype), square
            self.spread = self.value = self.half_form = square.new_zeros(())
            return
        with torch.no_grad():
            deviation = torch.linalg.vector_norm(torch.add(fd, self.maps, alpha=-1. / k), dtype=square.dtype).square()
            self.value = self.value + (self.spread + k * deviation) * (self.top_down + self.bottom_up)
            self.spread = self.spread + deviation * (k / (k + 1))
        if self.top_down:
            self.half_form = self.half_form + self.squares - (self.maps * fd).sum()
            self.squares = self.squares + square
        if self.bottom_up:
            self.half_form = self.half_form + k * square - (self.maps.detach() * f).sum()
        self.maps = self.maps + (f if self.top_down else fd)

    def loss(self) -> torch.Tensor:
        """The pair sum: its value, with the gradients of the expanded form."""
        return self.value + 2 * (self.half_form - self.half_form.detach())


def run_pair_mse(features: Sequence[torch.Tensor], direction: str = 'top-down') -> torch.Tensor:
    """Sum over all (student, target) pairs of equal-shape ``features`` in ``direction`` of ``mse(f_s, f_t.detach())``
    (``RunSum``), a scalar of float32 or wider; the gradients have the maps' dtype."""
    run = RunSum(direction)
    for f in features:
        run.add(f)
    return run.loss() / features[0].numel()


def _pair_mse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mse(student, target)`` accumulated in float32 at least (float16 squares overflow above 65504); the gradient
    has the student's dtype."""
    dtype = accumulation_dtype(student.dtype)
    return F.mse_loss(student.to(dtype), target.to(dtype))


class InterStage(NamedTuple):
    """What inter-layer Tf-FD computes as one stage is tapped (``inter_stage``)."""
    feature: torch.Tensor
    student: _Pooler  # the map, and the map pooled to its targets' sizes
    target: _Pooler  # the detached map, pooled as targets need it
    losses: Dict[Tuple[int, int], torch.Tensor]  # mse of the pairs whose later stage is this one
    run: Optional[RunSum]  # with pairs='all', the run of equal-shape maps that this stage ends so far


def _same_shape(stages: Sequence[InterStage]) -> bool:
    f = stages[0].feature
    return all(st.feature.shape == f.shape and st.feature.dtype == f.dtype for st in stages[1:])


def inter_stage(
        pos: int,
        feature: torch.Tensor,
        earlier: Sequence[InterStage],
        pairs: str = 'all',
        direction: str = 'top-down',
        reductions: Optional[Sequence[int]] = None,
) -> InterStage:
    """The part of the inter-layer loss that stage ``pos`` completes, computed as the stage is tapped.

    Every (student, target) pair is computed at the later of its two stages, the first moment both maps exist: its
    mse then sits in the autograd graph between those stages, and the backward pass forms its gradients when it
    reaches them (docs/design.md, "Where the terms are computed"). A run of equal-shape maps (``pairs='all'``) is
    summed by one ``RunSum`` that each of its stages adds its map to; ``inter_from_stages`` takes its loss.

    Args:
        pos: The stage's position, shallow to deep.
        feature: Its NCHW map.
        earlier: The ``InterStage`` of positions ``0 .. pos - 1`` of the same forward.
        pairs, direction: As in ``inter_layer_loss``.
        reductions: The stages' ``feature_info`` reductions, or ``None``. With them, the map is pooled right away to
            the sizes its deeper targets should have (its size divided by the integer ratio of the reductions), so that
            the full-size gradient of that pooling is formed when the backward pass reaches this stage. A target of
            another size is pooled from the map when its pair is computed; the values are the same either way.
    """
    student, target = _Pooler(feature), _Pooler(feature.detach())
    num_stages = len(reductions) if reductions is not None else pos + 1
    index_pairs = inter_layer_pairs(max(num_stages, 2), pairs, direction)
    if reductions is not None:
        h, w = feature.shape[-2:]
        for s, t in index_pairs:
            ratio = reductions[t] // reductions[s]
            if s == pos and ratio > 1 and reductions[t] % reductions[s] == 0 and h % ratio == 0 and w % ratio == 0:
                student((h // ratio, w // ratio))
    stages = list(earlier) + [InterStage(feature, student, target, {}, None)]
    if pairs == 'all' and pos and _same_shape(stages[pos - 1:]):  # the stage continues a run (or makes one)
        run = stages[pos - 1].run
        if run is None:
            run = RunSum(direction)
            run.add(stages[pos - 1].feature)
        run.add(feature)
        stages[pos] = stages[pos]._replace(run=run)
    for s, t in index_pairs:
        if max(s, t) != pos or (pairs == 'all' and _same_shape(stages[min(s, t):pos + 1])):
            continue
        fs, ft = stages[s].feature, stages[t].feature
        size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        c = min(fs.shape[1], ft.shape[1])
        stages[pos].losses[(s, t)] = _pair_mse(stages[s].student(size)[:, :c], stages[t].target(size)[:, :c])
    return stages[pos]


def inter_from_stages(
        features: Sequence[torch.Tensor],
        stages: Sequence[InterStage],
        pairs: str = 'all',
        direction: str = 'top-down',
) -> torch.Tensor:
    """The inter-layer loss from the ``inter_stage`` parts of every stage: the runs of equal-shape maps
    (``pairs='all'``) first, then the other pairs in ``inter_layer_pairs`` order, divided by the number of pairs."""
    index_pairs = inter_layer_pairs(len(features), pairs, direction)
    losses = {}
    for st in stages:
        losses.update(st.losses)
    total = 0.
    if pairs == 'all':
        for a, b in equal_shape_runs(features):
            total = total + stages[b - 1].run.loss() / features[a].numel()
    for p in index_pairs:
        if p in losses:
            total = total + losses[p]
    return total / len(index_pairs)


def inter_layer_loss(
        features: Sequence[torch.Tensor],
        pairs: str = 'all',
        direction: str = 'top-down',
) -> torch.Tensor:
    """Inter-layer Tf-FD loss, the mean over pairs of ``mse(pool(f_s)[:, :C], pool(f_t)[:, :C].detach())``.

    Args:
        features: NCHW maps, shallow to deep.
        pairs: ``'all'`` or ``'adjacent'`` (see ``inter_layer_pairs``).
        direction: ``'top-down'``, ``'bottom-up'`` or ``'bidirectional'``.
    """
    inter_layer_pairs(len(features), pairs, direction)  # validates
    stages = []
    for pos, f in enumerate(features):
        stages.append(inter_stage(pos, f, stages, pairs, direction))
    return inter_from_stages(features, stages, pairs, direction)

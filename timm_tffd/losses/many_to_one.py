"""Many-to-one channel distillation: each shallow channel is supervised by a group of deep channels (SFR (Fan, 2021)).

For a top-down pair (shallow, deep) the maps are average-pooled to a common spatial size as in inter-layer Tf-FD, the
deep map is detached, and its ``C_d`` channels are split into ``C_s`` contiguous groups ``G_c``, one per shallow
channel. The pair loss is

    L = 1/C_s sum_c 1/|G_c| sum_{j in G_c} mean_{b,h,w} (s_c - d_j)^2

When ``C_s`` does not divide ``C_d`` (``C_d = k C_s + r``), ``remainder='spread'`` (default) gives the first r groups
k + 1 channels and the others k; ``'drop'`` gives every group k channels and leaves the last r deep channels out. A
deep map with fewer channels than the shallow one is an error. ``L`` equals ``mse(s, group mean)`` plus the constant
within-group variance of the detached deep map, and is computed in that form (docs/sfr.md); runs of equal-shape maps
take inter-layer's O(L) path.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .inter import aligned_pairs, inter_layer_pairs, run_pair_mse, split_run_pairs

__all__ = ['many_to_one_loss', 'channel_groups', 'REMAINDERS']

REMAINDERS = ('spread', 'drop')


def _check_remainder(remainder: str):
    if remainder not in REMAINDERS:
        raise ValueError(f'unknown many-to-one remainder {remainder!r}; choose from {", ".join(REMAINDERS)}')


def channel_groups(c_shallow: int, c_deep: int, remainder: str = 'spread') -> List[int]:
    """Sizes of the contiguous deep-channel groups, one per shallow channel (they sum to the deep channels used).

    Args:
        c_shallow: Shallow channels C_s.
        c_deep: Deep channels C_d (at least C_s).
        remainder: ``'spread'`` or ``'drop'`` (see the module docstring).
    """
    _check_remainder(remainder)
    if c_deep < c_shallow:
        raise ValueError(f'many-to-one distillation needs at least as many deep channels as shallow ones, got '
                         f'{c_deep} deep for {c_shallow} shallow')
    k, r = divmod(c_deep, c_shallow)
    if remainder == 'drop':
        return [k] * c_shallow
    return [k + 1] * r + [k] * (c_shallow - r)


def _group_mean(x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """Mean of each contiguous group of ``sizes`` channels along dim 1."""
    if all(size == 1 for size in sizes):
        return x[:, :len(sizes)]  # one channel per group: a view, no copy
    means = []
    start = 0
    for size in sorted(set(sizes), reverse=True):  # runs of equal size (at most two): one reshape each
        count = sizes.count(size)
        means.append(x[:, start:start + count * size].unflatten(1, (count, size)).mean(2))
        start += count * size
    return torch.cat(means, 1)


def many_to_one_loss(
        features: Sequence[torch.Tensor],
        pairs: str = 'all',
        remainder: str = 'spread',
) -> torch.Tensor:
    """Many-to-one channel distillation loss, the mean over top-down pairs of the pair loss L above.

    Args:
        features: NCHW maps, shallow to deep.
        pairs: ``'all'`` or ``'adjacent'`` (see ``timm_tffd.losses.inter_layer_pairs``); deep always teaches shallow.
        remainder: ``'spread'`` or ``'drop'``: the groups when C_s does not divide C_d.
    """
    index_pairs = inter_layer_pairs(len(features), pairs, 'top-down')
    _check_remainder(remainder)  # also when every pair is in a run of equal shapes
    mean_squares = {}
    total = 0.
    rest = index_pairs
    if pairs == 'all':
        runs, rest = split_run_pairs(features, index_pairs)
        for a, b in runs:  # equal shapes: one channel per group, the pair loss is inter-layer's
            total = total + run_pair_mse(features[a:b], 'top-down')
    for s, t, student, deep in aligned_pairs(features, rest):
        sizes = channel_groups(student.shape[1], deep.shape[1], remainder)
        group_mean = _group_mean(deep, sizes)
        if len(sizes) == deep.shape[1]:  # one deep channel per group: V = 0
            total = total + F.mse_loss(student, group_mean)
            continue
        key = (t, tuple(deep.shape[-2:]))
        if key not in mean_squares:  # E[d_j^2] per deep channel, shared by every pair with this target
            mean_squares[key] = deep.pow(2).mean((0, 2, 3)).unsqueeze(0)
        # V = mean_c (mean_{j in G_c} E[d_j^2] - E[d_bar_c^2]): the within-group variance, without a pass over d - d_bar
        variance = (_group_mean(mean_squares[key], sizes) - group_mean.pow(2).mean((0, 2, 3))).mean()
        total = total + F.mse_loss(student, group_mean) + variance
    return total / len(index_pairs)

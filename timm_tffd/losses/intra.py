"""Intra-layer Tf-FD: salient channels supervise redundant ones in the same stage (Tf-FD (Li, ECCV 2022)).

Per stage, channels are ranked by a saliency score (recomputed every batch); the channel ranked k is paired with the
channel ranked k + C//2 and the loss is ``mse(f[:, top_half], f[:, bottom_half])``. With odd C the least salient
channel is left out. The layer loss is the mean over stages. As in the reference code's final version, gradients reach
both halves by default; ``detach_salient=True`` makes the salient half a fixed target (an earlier reference commit).
"""
from typing import Callable, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint

from .saliency import get_saliency

__all__ = ['intra_layer_loss', 'intra_stage_loss', 'paired_channel_mse']

SaliencyFn = Callable[[torch.Tensor], torch.Tensor]


def paired_channel_mse(
        f: torch.Tensor,
        salient: torch.Tensor,
        redundant: torch.Tensor,
        detach_salient: bool = False,
) -> torch.Tensor:
    """``mse(f[:, redundant], f[:, salient])`` over paired channel indices, accumulated in float32 at least (float16
    squares overflow above 65504).

    Args:
        f: NCHW map.
        salient: Channel indices of the salient half (the targets).
        redundant: Channel indices of the redundant half, ``redundant[k]`` paired with ``salient[k]``.
        detach_salient: Stop gradients into the salient half.
    """
    target = f[:, salient]
    d = f[:, redundant] - (target.detach() if detach_salient else target)
    return d.to(torch.promote_types(d.dtype, torch.float32)).square().mean()


def intra_stage_loss(
        feature: torch.Tensor,
        saliency: Union[str, SaliencyFn] = 'norm',
        detach_salient: bool = False,
        recompute: bool = False,
) -> torch.Tensor:
    """Intra-layer loss of one NCHW map.

    Args:
        feature: NCHW map.
        saliency: A metric name or a callable ``f -> (C,) scores``.
        detach_salient: Stop gradients into the salient half.
        recompute: Keep nothing but the map (which the network keeps anyway) for the backward and recompute the
            channel difference there (``torch.utils.checkpoint``): half a map less memory until the backward, one more
            gather in it. Same values and gradients.
    """
    half = feature.shape[1] // 2
    if half == 0:
        raise ValueError(f'intra-layer Tf-FD needs at least 2 channels, got a map of shape {tuple(feature.shape)}')
    fn = get_saliency(saliency) if isinstance(saliency, str) else saliency
    with torch.no_grad():
        order = fn(feature).argsort(descending=True)[:2 * half]
    if recompute and feature.requires_grad:
        return checkpoint(paired_channel_mse, feature, order[:half], order[half:], detach_salient,
                          use_reentrant=False, preserve_rng_state=False)
    return paired_channel_mse(feature, order[:half], order[half:], detach_salient)


def intra_layer_loss(
        features: Sequence[torch.Tensor],
        saliency: Union[str, SaliencyFn, Sequence[SaliencyFn]] = 'norm',
        detach_salient: bool = False,
) -> torch.Tensor:
    """Intra-layer Tf-FD loss averaged over stages.

    Args:
        features: NCHW maps, shallow to deep.
        saliency: A metric name (see ``timm_tffd.losses.saliency``), a callable ``f -> (C,) scores``, or one callable
            per feature.
        detach_salient: Stop gradients into the salient half.
    """
    if not len(features):
        raise ValueError('intra-layer Tf-FD needs at least one stage')
    if isinstance(saliency, str) or callable(saliency):
        fns = [saliency] * len(features)
    else:
        fns = list(saliency)
        if len(fns) != len(features):
            raise ValueError(f'got {len(fns)} saliency functions for {len(features)} features')
    total = 0.
    for f, fn in zip(features, fns):
        total = total + intra_stage_loss(f, fn, detach_salient)
    return total / len(features)

"""Intra-layer Tf-FD: salient channels supervise redundant ones in the same stage (seed 000).

Per stage, channels are ranked by a saliency score (recomputed every batch); the channel ranked k is paired with the
channel ranked k + C//2 and the loss is ``mse(f[:, top_half], f[:, bottom_half])``. With odd C the least salient
channel is left out. The layer loss is the mean over stages. As in the reference code's final version, gradients reach
both halves by default; ``detach_salient=True`` makes the salient half a fixed target (an earlier reference commit).
"""
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .saliency import get_saliency

__all__ = ['intra_layer_loss', 'intra_stage_loss']

SaliencyFn = Callable[[torch.Tensor], torch.Tensor]


def intra_stage_loss(
        feature: torch.Tensor,
        saliency: Union[str, SaliencyFn] = 'norm',
        detach_salient: bool = False,
) -> torch.Tensor:
    """Intra-layer loss of one NCHW map."""
    half = feature.shape[1] // 2
    if half == 0:
        raise ValueError(f'intra-layer Tf-FD needs at least 2 channels, got a map of shape {tuple(feature.shape)}')
    fn = get_saliency(saliency) if isinstance(saliency, str) else saliency
    with torch.no_grad():
        order = fn(feature).argsort(descending=True)[:2 * half]
    ranked = feature.index_select(1, order)
    salient, redundant = ranked[:, :half], ranked[:, half:]
    if detach_salient:
        salient = salient.detach()
    return F.mse_loss(redundant, salient)


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

"""Intra-layer Tf-FD: salient channels supervise redundant ones in the same stage (Tf-FD (Li, ECCV 2022)).

Per stage, channels are ranked by a saliency score (recomputed every batch); the channel ranked k is paired with the
channel ranked k + C//2 and the loss is ``mse(f[:, top_half], f[:, bottom_half])``. With odd C the least salient
channel is left out. The layer loss is the mean over stages. As in the reference code's final version, gradients reach
both halves by default; ``detach_salient=True`` makes the salient half a fixed target (an earlier reference commit).
"""
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .saliency import channels_last_map, get_saliency

__all__ = ['intra_layer_loss', 'intra_stage_loss', 'paired_channel_mse', 'partner_mse']

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


def partner_mse(f: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``paired_channel_mse`` with gradients into both halves, from the pairing as a permutation of the channels:
    ``partner[c]`` is the channel paired with ``c`` (``c`` itself for a channel left out). Same value and gradients.

    Summed over every channel, ``||f_c - f_partner(c)||^2`` counts each pair twice; with the partner's map detached,
    its gradient is the gradient of the pairs counted once (each channel gets from its own term what its pair gives
    it). The loss is that sum halved in value, whole in gradient. Its backward is one elementwise pass over the map,
    where the two gathers of ``paired_channel_mse`` scatter into two zeroed full-size maps: on resnet18's maps
    (batch 16, 224 px, one CPU thread, the difference recomputed in the backward) the term costs 45% less.

    Args:
        f: NCHW map.
        partner: ``(C,)`` channel indices, an involution.
    """
    other = f[:, partner] if channels_last_map(f) else f.index_select(1, partner)  # the faster gather per layout
    dtype = torch.promote_types(f.dtype, torch.float32)  # float16 squares overflow above 65504
    n = f.shape[0] * (f.shape[1] // 2) * f.shape[2] * f.shape[3]  # values in each half
    pairs = F.mse_loss(f.to(dtype), other.detach().to(dtype), reduction='sum') / (2 * n)
    return 2 * pairs - pairs.detach()


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
            channel difference there (``torch.utils.checkpoint``): half a map less memory until the backward. The
            recomputed form is ``partner_mse`` (a faster backward); ``paired_channel_mse`` with ``detach_salient``,
            and under ``torch.compile`` for channels-last maps. Same values and gradients.
    """
    half = feature.shape[1] // 2
    if half == 0:
        raise ValueError(f'intra-layer Tf-FD needs at least 2 channels, got a map of shape {tuple(feature.shape)}')
    fn = get_saliency(saliency) if isinstance(saliency, str) else saliency
    with torch.no_grad():
        order = fn(feature).argsort(descending=True)[:2 * half]
    salient, redundant = order[:half], order[half:]
    if not (recompute and feature.requires_grad):
        return paired_channel_mse(feature, salient, redundant, detach_salient)
    if detach_salient or (torch.compiler.is_compiling() and channels_last_map(feature)):
        # compiled: inductor (CPU, torch 2.14.1) fails on partner_mse's recomputation inside ConvNeXt's backward (a
        # KeyError in its C++ loop fusion), whose maps are channels-last views; those keep the plain form there
        return checkpoint(paired_channel_mse, feature, salient, redundant, detach_salient, use_reentrant=False,
                          preserve_rng_state=False)
    with torch.no_grad():  # each ranked channel's partner is the one ranked half the channels away
        partner = torch.arange(feature.shape[1], device=feature.device).index_copy_(0, order, order.roll(half))
    return checkpoint(partner_mse, feature, partner, use_reentrant=False, preserve_rng_state=False)


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

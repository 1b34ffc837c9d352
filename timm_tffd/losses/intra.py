"""Intra-layer Tf-FD: salient channels supervise redundant ones in the same stage (seed 000).

Per stage, channels are ranked by a saliency score (recomputed every batch); the channel ranked k is paired with the
channel ranked k + C//2 and the loss is ``mse(f[:, top_half], f[:, bottom_half])``. With odd C the least salient
channel is left out. The layer loss is the mean over stages. As in the reference code's final version, gradients reach
both halves by default; ``detach_salient=True`` makes the salient half a fixed target (an earlier reference commit).
"""
from typing import Callable, Optional, Sequence, Union

import torch

from .saliency import get_saliency

__all__ = ['intra_layer_loss', 'intra_stage_loss', 'paired_channel_mse']

SaliencyFn = Callable[[torch.Tensor], torch.Tensor]


class _PairedChannelMSE(torch.autograd.Function):
    """``mse(f[:, redundant], f[:, salient])`` with a one-pass backward.

    Autograd through ``index_select`` would zero a full-size gradient and scatter into it with ``index_add_`` (slow
    on CPU); here the gradient is written directly: ``+d`` into the redundant channels, ``-d`` into the salient ones
    (nothing with ``detach_salient``), zeros only for a left-out channel. Only ``f`` is saved (autograd keeps the
    stage output anyway); the difference is recomputed in backward instead of being held until then.
    """

    @staticmethod
    def forward(ctx, f, salient, redundant, detach_salient: bool):
        # advanced indexing, not index_select: on the strided token views of ViT-family models index_select first
        # makes the whole map contiguous (3x slower)
        diff = f[:, redundant].sub_(f[:, salient])
        ctx.save_for_backward(f, salient, redundant)
        ctx.detach_salient = detach_salient
        return diff.square_().mean()

    @staticmethod
    def backward(ctx, grad_out):
        f, salient, redundant = ctx.saved_tensors
        d = f[:, redundant].sub_(f[:, salient])
        d.mul_(2 * grad_out / d.numel())
        full = f.shape[1] == 2 * d.shape[1] and not ctx.detach_salient
        # the gradient in the map's own layout (channels last for token views), so nothing is transposed after
        layout = torch.channels_last if f.stride(1) == 1 and f.shape[1] > 1 else torch.contiguous_format
        grad = torch.empty(f.shape, dtype=d.dtype, device=d.device, memory_format=layout)
        if not full:
            grad.zero_()
        grad[:, redundant] = d
        if not ctx.detach_salient:
            grad[:, salient] = d.neg_()
        return grad, None, None, None


def paired_channel_mse(
        f: torch.Tensor,
        salient: torch.Tensor,
        redundant: torch.Tensor,
        detach_salient: bool = False,
) -> torch.Tensor:
    """``mse(f[:, redundant], f[:, salient])`` over paired channel indices, with an optional stop-gradient on the
    salient side."""
    return _PairedChannelMSE.apply(f, salient, redundant, detach_salient)


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

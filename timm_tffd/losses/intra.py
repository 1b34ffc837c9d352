"""Intra-layer Tf-FD: salient channels supervise redundant ones in the same stage (seed 000).

Per stage, channels are ranked by a saliency score (recomputed every batch); the channel ranked k is paired with the
channel ranked k + C//2 and the loss is ``mse(f[:, top_half], f[:, bottom_half])``. With odd C the least salient
channel is left out. The layer loss is the mean over stages. As in the reference code's final version, gradients reach
both halves by default; ``detach_salient=True`` makes the salient half a fixed target (an earlier reference commit).
"""
from typing import Callable, List, Sequence, Union

import torch

from .saliency import channels_last_map, get_saliency
from .sink import GradLayout, backward_slot, sink_slot

__all__ = ['intra_layer_loss', 'intra_stage_loss', 'paired_channel_mse']

SaliencyFn = Callable[[torch.Tensor], torch.Tensor]


def _pair_difference(f: torch.Tensor, salient: torch.Tensor, redundant: torch.Tensor) -> torch.Tensor:
    """``f[:, redundant] - f[:, salient]`` of an NCHW map that is not channels last (see ``_partner_difference``)."""
    if f.is_contiguous():  # whole H x W planes: index_select copies them faster than advanced indexing
        return f.index_select(1, redundant).sub_(f.index_select(1, salient))
    # other strided maps: advanced indexing, not index_select, which would first make the map contiguous
    return f[:, redundant].sub_(f[:, salient])


def _partner_index(c: int, salient: torch.Tensor, redundant: torch.Tensor, both: bool = True) -> torch.Tensor:
    """``partner[i]``: the channel paired with channel ``i``; ``i`` itself for a channel left out (odd C), and, with
    ``both=False``, for the salient ones."""
    partner = torch.arange(c, device=salient.device)
    partner[redundant] = salient
    if both:
        partner[salient] = redundant
    return partner


def _partner_difference(f: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``f[:, partner] - f``, in ``f``'s memory layout.

    Gathering all channels in partner order once, instead of the two halves, gives a difference in the map's own
    channel order: its square sums to twice the pairs' sum, and it is (up to sign and scale) the gradient of every
    channel at once, which backward writes or adds with one elementwise op instead of indexed writes (``index_put``
    and ``index_add_`` on channel planes, or scatters along the channel dim, are several times slower). A channel that
    is its own partner (left out, or detached) gets zeros. On channels-last maps (token views of ViT-family models)
    the gather runs along the contiguous channel dim."""
    if channels_last_map(f):
        t = f.permute(0, 2, 3, 1)
        return torch.gather(t, -1, partner.expand(t.shape)).sub_(t).permute(0, 3, 1, 2)
    if f.is_contiguous():
        return f.index_select(1, partner).sub_(f)
    return f[:, partner].sub_(f)


# Temporaries (the gathered channels and their difference) are made a few batch samples at a time, at most this
# many elements: small buffers that the allocator hands out again, not a fresh half-map per call. On CPU a large
# fresh buffer costs a page fault per 4 KiB on first touch, and on a ResNet-50 the first stage's halves are 26 MB.
_CHUNK_NUMEL = 1 << 20


def _batch_chunks(f: torch.Tensor, channels: int) -> List[slice]:
    """Batch slices whose temporaries of ``channels`` gathered channels hold at most ``_CHUNK_NUMEL`` elements."""
    per_sample = max(1, channels * f.shape[2] * f.shape[3])
    step = max(1, _CHUNK_NUMEL // per_sample)
    return [slice(i, i + step) for i in range(0, f.shape[0], step)]


class _PairedChannelMSE(torch.autograd.Function):
    """``mse(f[:, redundant], f[:, salient])`` with a one-pass backward.

    Autograd through the indexing would zero a full-size gradient and scatter-add into it; here the gradient of
    every channel, ``+d`` for the redundant ones, ``-d`` for the salient ones (zero with ``detach_salient``, and for a
    channel left out), comes in the map's own channel order from one gather (``_partner_difference``) and is written
    with one elementwise op per chunk. The forward value gathers the two halves (half the elements), except on
    channels-last maps, where the gather along the channel dim is the cost and one full gather is cheaper than two.
    When ``f`` comes from ``sink_features`` the gradient goes into the map's shared buffer instead (written if no
    other term has touched it yet, else added).
    Only ``f`` is saved (autograd keeps the stage output anyway); the difference is recomputed in backward, chunk by
    chunk, instead of being held until then. The gradient has the map's own layout (channels last for token views),
    so nothing is transposed after.
    """

    @staticmethod
    def forward(ctx, f, salient, redundant, detach_salient: bool):
        ctx.save_for_backward(f, salient, redundant)
        ctx.detach_salient = detach_salient
        ctx.slot = sink_slot(f)
        total = f.new_zeros((), dtype=torch.promote_types(f.dtype, torch.float32))
        if channels_last_map(f):  # every pair appears twice, once from each side
            partner, counted = _partner_index(f.shape[1], salient, redundant), 2
            chunks, difference = _batch_chunks(f, f.shape[1]), lambda x: _partner_difference(x, partner)
        else:
            chunks, counted = _batch_chunks(f, redundant.numel()), 1
            difference = lambda x: _pair_difference(x, salient, redundant)  # noqa: E731
        for chunk in chunks:
            d = difference(f[chunk])
            if d.dtype == torch.float16:  # timm's default AMP dtype: squares above 65504 would overflow
                d = d.float()
            total += d.square_().sum(dtype=total.dtype)
        return total / (counted * f.shape[0] * redundant.numel() * f.shape[2] * f.shape[3])

    @staticmethod
    def backward(ctx, grad_out):
        f, salient, redundant = ctx.saved_tensors
        b, c, h, w = f.shape
        scale = 2 * grad_out / (b * redundant.numel() * h * w)
        slot = backward_slot(ctx.slot)
        if slot is not None:
            grad, fresh = slot[0].claim(slot[1])
        else:
            grad, fresh = GradLayout(f).new()[1], True
        # every channel's gradient is scale * (f - f[:, partner]): zero for a channel that is its own partner
        partner = _partner_index(c, salient, redundant, both=not ctx.detach_salient)
        neg_scale = -scale
        for chunk in _batch_chunks(f, c):
            d = _partner_difference(f[chunk], partner)  # f[:, partner] - f
            if fresh:
                grad[chunk].copy_(d.mul_(neg_scale))
            else:
                grad[chunk].addcmul_(d, neg_scale)
        return (None if slot is not None else grad), None, None, None


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

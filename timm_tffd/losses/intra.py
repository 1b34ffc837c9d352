"""Intra-layer Tf-FD: salient channels supervise redundant ones in the same stage (Tf-FD (Li, ECCV 2022)).

Per stage, channels are ranked by a saliency score (recomputed every batch; ``salience_order``: equal scores in channel
order); the channel ranked k is paired with the channel ranked k + C//2 and the loss is
``mse(f[:, top_half], f[:, bottom_half])``. With odd C the least salient channel is left out. The layer loss is the
mean over stages. As in the reference code's final version, gradients reach both halves by default;
``detach_salient=True`` makes the salient half a fixed target (an earlier reference commit).
"""
from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint

from .saliency import accumulation_dtype, channels_last_map, get_saliency

__all__ = ['intra_layer_loss', 'intra_stage_loss', 'paired_channel_mse', 'partner_mse', 'salience_order']

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
    return d.to(accumulation_dtype(d.dtype)).square().mean()


def salience_order(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices from the highest score to the lowest, equal scores in index order, a NaN score counted as +inf.

    Eager: a stable ``argsort``. Compiled (``torch.compile``): the same order by counting, ``C x C`` comparisons that
    inductor fuses into two reductions: the number of channels ranked before a channel is its position, and the
    channel at each position is found by comparing positions. A sort is an operation inductor's partitioner does not
    fuse: placed between a ViT block's output and the next block's LayerNorm in the forward, it kept that LayerNorm's
    output saved for the backward next to the block output, a ``(B, 197, 384)`` map per block (docs/design.md, "The
    compiled step"). Equal scores are common on small maps (every positive 1 x 1 channel scores 1 by ``norm``), and
    the order among them decides the pairs; the reference code's unstable sort leaves it to the sort's
    implementation, so the two forms fix it the same way.
    """
    scores = torch.where(scores.isnan(), float('inf'), scores)
    if not torch.compiler.is_compiling():
        return scores.argsort(descending=True, stable=True)
    index = torch.arange(scores.shape[0], device=scores.device)
    higher, same = scores[None, :] > scores[:, None], scores[None, :] == scores[:, None]
    position = (higher | (same & (index[None, :] < index[:, None]))).sum(1)  # channels ranked before each one
    return _inverse_permutation(position)


def _inverse_permutation(p: torch.Tensor) -> torch.Tensor:
    """``q`` with ``q[p[i]] = i``, by ``C x C`` comparisons (no scatter: see ``salience_order``)."""
    index = torch.arange(p.shape[0], device=p.device)
    return ((p[None, :] == index[:, None]) * index[None, :]).sum(1)


def _channels(f: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``f[:, index]``, by the fastest plain gather for the map's memory layout (CPU, 2 threads; docs/design.md,
    "Intra-layer pairs"). A contiguous NCHW map: ``index_select``, which copies whole channel planes (0.2 to 0.5x the
    time of advanced indexing on half of resnet18's and resnet50's layer1 channels). A channels-last map (a ViT's token
    view, a channels-last CNN map): ``torch.gather`` along the channels of its NHWC view, the innermost dimension in
    memory, writing a channels-last result (0.6x the time of advanced indexing on a ViT-S token view, 0.3 to 0.7x on
    channels-last resnet50 maps). Any other map keeps advanced indexing."""
    if f.is_contiguous():
        return f.index_select(1, index)
    if channels_last_map(f):
        nhwc = f.permute(0, 2, 3, 1)
        return torch.gather(nhwc, 3, index.expand(nhwc.shape[:3] + index.shape)).permute(0, 3, 1, 2)
    return f[:, index]


def _pair_count(f: torch.Tensor) -> int:
    """Values in each half of a paired map: the mean of ``paired_channel_mse`` divides by it."""
    return f.shape[0] * (f.shape[1] // 2) * f.shape[2] * f.shape[3]


class _PartnerMSE(torch.autograd.Function):  # kept for its measured gain: docs/design.md, "Intra-layer pairs"
    """``paired_channel_mse``, saving only the map and the pairing as an involution of the channels."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, salient: torch.Tensor, redundant: torch.Tensor, partner: torch.Tensor,
                learns: Optional[torch.Tensor]):
        ctx.save_for_backward(f, partner, learns)
        d = _channels(f, redundant).sub_(_channels(f, salient))  # each pair once, from two half-size gathers
        return torch.linalg.vector_norm(d, dtype=accumulation_dtype(f.dtype)).square() / _pair_count(f)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        f, partner, learns = ctx.saved_tensors
        # d mse / d f_c = 2 (f_c - f_partner(c)) / n. A 4-d scale, not a 0-d one: by type promotion a 0-d operand
        # takes a float16 map's dtype, and on CUDA it is rounded to it before the multiply (a large map's scale
        # underflows); a 4-d float32 one makes the multiply float32 on every device
        scale = (grad * (-2. / _pair_count(f))).view(1, 1, 1, 1)
        if learns is not None:
            scale = scale * learns.view(1, -1, 1, 1)
        return _channels(f, partner).sub_(f).mul_(scale), None, None, None, None


def partner_mse(
        f: torch.Tensor,
        salient: torch.Tensor,
        redundant: torch.Tensor,
        detach_salient: bool = False,
) -> torch.Tensor:
    """``paired_channel_mse`` (same arguments, value and gradients; float32 or wider) that keeps nothing but the map
    for the backward.

    The forward gathers the two halves (half-size temporaries). The backward forms the gradient from the pairing as a
    permutation of the channels, ``partner[c]`` the channel paired with ``c`` (``c`` itself for a channel left out):
    the gradient of a pair's mse reaching channel ``c`` is ``2 (f_c - f_partner(c)) / n``, one gather of the channels
    in partner order. Through plain autograd the two indexed halves each zero-fill a full-size gradient and scatter
    into it, and the difference is kept until the backward; recomputed under ``torch.utils.checkpoint``, the map is
    gathered and its difference materialized twice per pass: see docs/design.md, "Intra-layer pairs", for what each
    form costs.
    """
    with torch.no_grad():
        partner = torch.arange(f.shape[1], device=f.device)
        partner.index_copy_(0, salient, redundant).index_copy_(0, redundant, salient)
        learns = None
        if detach_salient:  # 1 for the channels that get gradients, float32 or wider
            learns = torch.ones(f.shape[1], device=f.device, dtype=accumulation_dtype(f.dtype))
            learns.index_fill_(0, salient, 0.)
    return _PartnerMSE.apply(f, salient, redundant, partner, learns)


def _partner_sum(f: torch.Tensor, ranked: torch.Tensor, half: int, detach_salient: bool = False) -> torch.Tensor:
    """``paired_channel_mse`` (value and gradients) for compiled code, through plain operations that inductor fuses:
    every channel against its detached partner (``ranked``: ``salience_order``'s permutation), ``s = sum_c ||f_c -
    f_partner(c)||^2 / n``, which counts each pair twice; its gradient, ``2 (f_c - f_partner(c)) / n``, is the pair
    mse's, so the term is ``s`` halved in value and whole in gradient. The partners and the channels that learn are
    found by comparisons, not by a scatter (see ``salience_order`` for why compiled code avoids operations inductor's
    partitioner does not fuse); the backward is one gather of the map and pointwise operations. Compiled ViT-S
    inter+intra step: 0.95x the time of the paired form recomputed under ``torch.utils.checkpoint`` (docs/design.md,
    "Intra-layer pairs")."""
    with torch.no_grad():
        position = _inverse_permutation(ranked)  # where each channel is ranked
        partner = ranked[torch.where(position < half, position + half,
                                     torch.where(position < 2 * half, position - half, position))]
    squares = (f - f.detach()[:, partner]).to(accumulation_dtype(f.dtype)).square()
    if detach_salient:  # the salient half gets no gradient
        squares = torch.where((position >= half).view(1, -1, 1, 1), squares, squares.detach())
    s = squares.sum() / _pair_count(f)
    return s - s.detach() / 2


def intra_stage_loss(
        feature: torch.Tensor,
        saliency: Union[str, SaliencyFn] = 'norm',
        detach_salient: bool = False,
        recompute: bool = False,
        token_view: bool = False,
) -> torch.Tensor:
    """Intra-layer loss of one NCHW map.

    Args:
        feature: NCHW map.
        saliency: A metric name or a callable ``f -> (C,) scores``.
        detach_salient: Stop gradients into the salient half.
        recompute: Keep nothing but the map (which the network keeps anyway) for the backward and recompute the
            channel difference there: half a map less memory until the backward (``partner_mse``; under
            ``torch.compile``, token views take ``_partner_sum`` and other channels-last maps ``paired_channel_mse``
            under ``torch.utils.checkpoint``). Without it, ``paired_channel_mse`` through plain autograd. Same values
            and gradients.
        token_view: The map is a channels-last view of a token model's block output: compiled, it takes
            ``_partner_sum`` (other channels-last maps cannot).
    """
    half = feature.shape[1] // 2
    if half == 0:
        raise ValueError(f'intra-layer Tf-FD needs at least 2 channels, got a map of shape {tuple(feature.shape)}')
    fn = get_saliency(saliency) if isinstance(saliency, str) else saliency
    with torch.no_grad():
        ranked = salience_order(fn(feature))
    salient, redundant = ranked[:half], ranked[half:2 * half]
    if not (recompute and feature.requires_grad):
        return paired_channel_mse(feature, salient, redundant, detach_salient)
    if torch.compiler.is_compiling() and channels_last_map(feature):
        # inductor (CPU, torch 2.14.1) fails on a backward that gathers the map in partner order inside ConvNeXt's (a
        # KeyError in its C++ loop fusion), whose maps are channels-last; those keep the paired form, recomputed in
        # the backward. The channels-last token views of ViT-family models (views of their block outputs) take the
        # pairing through plain operations
        if token_view:
            return _partner_sum(feature, ranked, half, detach_salient)
        return checkpoint(paired_channel_mse, feature, salient, redundant, detach_salient, use_reentrant=False,
                          preserve_rng_state=False)
    return partner_mse(feature, salient, redundant, detach_salient)


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

"""Registry of feature self-distillation methods selectable with ``tffd='inter,intra,...'``.

A method is built once per wrapped model from a ``MethodContext`` (the model and its tapped stages) and keyword
options, and returns a callable ``features -> scalar loss``. ``TfFDConfig`` routes each option to the methods whose
builder names it, so ``wrap(model, 'inter,intra', pairs='adjacent', saliency='entropy')`` configures both methods.

A loss callable may also do per-stage work while the forward runs (``StagedLoss``): ``at_tap(position, feature,
earlier)`` is called as each stage is tapped (when the taps use hooks) and the loss is then ``loss_fn(features,
staged)`` with the list of what ``at_tap`` returned. Both ways give the same values; the staged one holds less memory
in the backward (docs/design.md, "Where the terms are computed"). Inter and intra are staged.
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .losses.emd import check_emd_options, emd_layer_loss
from .losses.inter import InterStage, inter_from_stages, inter_layer_pairs, inter_stage
from .losses.intra import intra_stage_loss
from .losses.many_to_one import channel_groups, many_to_one_loss
from .losses.saliency import MODEL_SALIENCY, bn_scale_saliency, get_saliency

__all__ = ['MethodContext', 'TfFDMethod', 'StagedLoss', 'register_method', 'get_method', 'list_methods',
           'parse_methods']

LossFn = Callable[[List[torch.Tensor]], torch.Tensor]


@dataclass
class MethodContext:
    """What a method builder may read: the model and the tapped stages (shallow to deep). ``copies``: the tapped maps
    are copies made for the taps (pre-activation maps), not tensors the network keeps for its own backward.
    ``token_views``: the tapped maps are channels-last views of a token model's block outputs (``FeatureTaps``)."""
    model: nn.Module
    indices: List[int]
    modules: List[str]
    channels: List[int]
    reductions: List[int]
    copies: bool = False
    token_views: bool = False


@dataclass
class TfFDMethod:
    """A registered method.

    Args:
        name: The name used in ``tffd='...'`` and ``--tffd``.
        build: ``build(ctx, **options) -> loss_fn``; its keyword parameters are the method's options.
        default_weight: The loss weight used when none is given.
        description: One line for help texts.
    """
    name: str
    build: Callable[..., LossFn]
    default_weight: float
    description: str = ''

    def options(self) -> Dict[str, object]:
        """Option names and defaults, read from the builder's signature."""
        params = list(inspect.signature(self.build).parameters.values())[1:]
        return {p.name: p.default for p in params}


_METHODS: Dict[str, TfFDMethod] = {}


def register_method(name: str, build: Callable[..., LossFn], default_weight: float, description: str = ''):
    """Register a method so ``wrap()``, ``TfFDLoss`` and the training script can select it by name."""
    if name in _METHODS:
        raise ValueError(f'Tf-FD method {name!r} is already registered')
    _METHODS[name] = TfFDMethod(name, build, default_weight, description)


def list_methods() -> List[str]:
    return list(_METHODS)


def get_method(name: str) -> TfFDMethod:
    if name not in _METHODS:
        raise ValueError(f'unknown Tf-FD method {name!r}; valid methods: {", ".join(_METHODS)}')
    return _METHODS[name]


def parse_methods(tffd) -> List[str]:
    """Parse ``'inter,intra'`` (or a list of names) into validated, de-duplicated method names."""
    names = tffd.split(',') if isinstance(tffd, str) else list(tffd)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f'no Tf-FD method given; valid methods: {", ".join(_METHODS)}')
    for n in names:
        get_method(n)
    if len(set(names)) != len(names):
        raise ValueError(f'Tf-FD method listed twice in {tffd!r}')
    return names


def _check_two_stages(ctx: MethodContext, method: str):
    if len(ctx.indices) < 2:
        raise ValueError(f'{method} needs at least two stages, got {len(ctx.indices)} (stages {ctx.indices}: '
                         f'{ctx.modules})')


class StagedLoss:
    """A loss that does part of its work as each stage is tapped (see the module docstring).

    ``at_tap(pos, feature, earlier)`` returns the stage's part (``earlier``: the parts of the stages tapped before it in
    the same forward); ``loss(features, staged)`` finishes the loss from the maps and every stage's part. Called with
    the maps alone, it computes the parts itself, in stage order.
    """

    def at_tap(self, pos: int, feature: torch.Tensor, earlier: List[Any]) -> Any:
        raise NotImplementedError

    def loss(self, features: List[torch.Tensor], staged: List[Any]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, features: List[torch.Tensor], staged: Optional[Sequence[Any]] = None) -> torch.Tensor:
        if staged is None:
            staged = []
            for pos, f in enumerate(features):
                staged.append(self.at_tap(pos, f, staged))
        return self.loss(features, list(staged))


class InterLayer(StagedLoss):
    """Inter-layer Tf-FD over fixed pairs (see ``timm_tffd.losses.inter``): each pair's mse is computed when its later
    stage is tapped, each student map pooled to its targets' sizes when it is tapped."""

    def __init__(self, pairs: str, direction: str, reductions: Sequence[int]):
        inter_layer_pairs(len(reductions), pairs, direction)  # validates the names
        self.pairs, self.direction, self.reductions = pairs, direction, list(reductions)

    def at_tap(self, pos: int, feature: torch.Tensor, earlier: List[Any]) -> InterStage:
        return inter_stage(pos, feature, earlier, self.pairs, self.direction, self.reductions)

    def loss(self, features: List[torch.Tensor], staged: List[Any]) -> torch.Tensor:
        return inter_from_stages(features, staged, self.pairs, self.direction)


class IntraLayer(StagedLoss):
    """Intra-layer Tf-FD with one saliency function per stage (see ``timm_tffd.losses.intra``); each stage's term is
    computed when the stage is tapped.

    Args:
        saliency: A metric name, or one callable per stage.
        detach_salient: Stop gradients into the salient half.
        recompute: Recompute the channel differences in the backward from the maps (``intra_stage_loss``): right when
            the maps are tensors the network keeps for its own backward, not for copies (pre-activation taps).
        token_views: The maps are token views (``intra_stage_loss``'s ``token_view``).
    """

    def __init__(self, saliency, detach_salient: bool, recompute: bool = True, token_views: bool = False):
        self.saliency, self.detach_salient, self.recompute = saliency, detach_salient, recompute
        self.token_views = token_views

    def at_tap(self, pos: int, feature: torch.Tensor, earlier: List[Any]) -> torch.Tensor:
        fn = self.saliency if isinstance(self.saliency, str) else self.saliency[pos]
        return intra_stage_loss(feature, fn, self.detach_salient, self.recompute, self.token_views)

    def loss(self, features: List[torch.Tensor], staged: List[Any]) -> torch.Tensor:
        return sum(staged) / len(staged)  # the order of intra_layer_loss's sum


def _build_inter(ctx: MethodContext, pairs: str = 'all', direction: str = 'top-down') -> LossFn:
    _check_two_stages(ctx, 'inter-layer Tf-FD')
    return InterLayer(pairs, direction, ctx.reductions)  # validates the names


def _build_intra(ctx: MethodContext, saliency: str = 'norm', detach_salient: bool = False) -> LossFn:
    small = [m for m, c in zip(ctx.modules, ctx.channels) if c < 2]
    if small:
        raise ValueError(f'intra-layer Tf-FD needs at least 2 channels per stage; {small} have fewer')
    recompute = not ctx.copies
    if saliency in MODEL_SALIENCY:
        fns = [bn_scale_saliency(ctx.model, m, c) for m, c in zip(ctx.modules, ctx.channels)]
        return IntraLayer(fns, detach_salient, recompute, ctx.token_views)
    get_saliency(saliency)  # validates the name
    return IntraLayer(saliency, detach_salient, recompute, ctx.token_views)


# Default weights: the reference code's argparse defaults (lambda_inter = 0.005, lambda_intra = 0.0004), which are
# also alpha and beta of TFD (Li et al., IJCNN 2022). The reference README's example command uses 0.0005 / 0.0008.
register_method('inter', _build_inter, 0.005, 'deep stage outputs supervise shallow ones (l2)')
register_method('intra', _build_intra, 0.0004, 'salient channels supervise redundant ones in the same stage (l2)')


# SFR (Fan, 2021) names EMD-l2 matching and many-to-one distillation without their settings. The pairs default to
# inter's 'all' (the reference code); the solver and remainder defaults are documented in docs/sfr.md.
def _build_emd(
        ctx: MethodContext,
        emd_grid: Optional[int] = None,
        emd_pairs: str = 'all',
        emd_eps: float = 0.02,
        emd_iters: int = 50,
) -> LossFn:
    _check_two_stages(ctx, 'EMD-l2 matching')
    inter_layer_pairs(len(ctx.indices), emd_pairs)  # validates the name
    check_emd_options(emd_grid, emd_eps, emd_iters)
    return functools.partial(emd_layer_loss, pairs=emd_pairs, grid=emd_grid, eps=emd_eps, iters=emd_iters)


def _build_m2o(ctx: MethodContext, m2o_pairs: str = 'all', m2o_remainder: str = 'spread') -> LossFn:
    _check_two_stages(ctx, 'many-to-one distillation')
    narrower = []
    for s, t in inter_layer_pairs(len(ctx.indices), m2o_pairs):
        if ctx.channels[t] < ctx.channels[s]:
            narrower.append(f'{ctx.modules[t]} ({ctx.channels[t]}) for {ctx.modules[s]} ({ctx.channels[s]})')
        else:
            channel_groups(ctx.channels[s], ctx.channels[t], m2o_remainder)  # validates the remainder
    if narrower:
        raise ValueError(f'many-to-one distillation needs at least as many channels in the deep stage as in the '
                         f'shallow one; deep stages with fewer: {", ".join(narrower)}. Choose stages= or m2o_pairs=')
    return functools.partial(many_to_one_loss, pairs=m2o_pairs, remainder=m2o_remainder)


# Default weights: inter's 0.005 for both (SFR gives none); docs/sfr.md explains why equal weights give the three
# l2 terms the same strength.
register_method('emd', _build_emd, 0.005, 'deep local descriptors supervise shallow ones up to a matching (EMD-l2)')
register_method('m2o', _build_m2o, 0.005, 'each shallow channel is supervised by a group of deep channels (l2)')

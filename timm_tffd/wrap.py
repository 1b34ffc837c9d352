"""``wrap()`` / ``unwrap()``: turn a timm model into a Tf-FD model in place, without changing what it is.

The wrapped model is the same object: same class, same ``state_dict`` keys and values, same parameters (so timm's
optimizer factories, EMA, checkpoint saver and hub helpers see a plain timm model). Only its ``forward`` changes, and
only in training mode: it taps the selected stages in the same pass that produces the logits, computes the unweighted
Tf-FD terms, and leaves them for ``TfFDLoss`` to take exactly once. In eval mode the class's own forward runs
untouched.
"""
import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.utils.model import unwrap_model

from .features import FeatureTaps
from .config import TfFDConfig
from .methods import MethodContext, StagedLoss, get_method

__all__ = ['wrap', 'unwrap', 'is_wrapped', 'get_tffd_state', 'record_forward', 'tapped_features',
           'nonfinite_stages', 'diagnose_nonfinite', 'TfFDState', 'TfFDStash']

_ATTR = '_tffd_state'


@dataclass
class TfFDStash:
    """What one training forward leaves for the criterion (``features``: the tapped maps, or ``None`` unless
    ``TfFDState.keep_features``)."""
    output: torch.Tensor
    terms: Dict[str, torch.Tensor]
    features: Optional[List[torch.Tensor]]


class TfFDState:
    """Per-model Tf-FD state. A plain object, so it adds nothing to ``state_dict``.

    Args:
        config: The resolved ``TfFDConfig``.
        taps: The feature taps of the wrapped model.
        methods: ``{name: loss_fn}`` built from the config.

    Attributes:
        keep_features: Leave the tapped maps in the stash too, for what reads them after the forward
            (``tapped_features``: SFD's integrator; ``TfFDLoss(check_finite=True)``, to name the non-finite stages);
            those consumers set it. Off by default: maps handed out of a compiled forward must be materialized as
            its outputs, in the strides eager mode gives them, where inductor keeps them in another layout (channels
            last for convolutions on CPU): 7% of a compiled resnet18 step's time and 6% of its memory (CPU).
    """

    def __init__(self, config: TfFDConfig, taps: FeatureTaps, methods: Dict[str, object]):
        self.config = config
        self.taps = taps
        self.methods = methods
        self.stash: Optional[TfFDStash] = None
        self.keep_features = False
        self.staged = {name: fn for name, fn in methods.items() if isinstance(fn, StagedLoss)}
        if self.staged:
            taps.on_tap = self.at_tap

    def at_tap(self, pos: int, feature: torch.Tensor, earlier: Dict[int, Dict[str, object]]) -> Dict[str, object]:
        """The staged methods' parts of one stage, computed as it is tapped (``FeatureTaps.on_tap``; ``earlier``: the
        parts of the stages tapped before it in this forward)."""
        if len(earlier) != pos:
            raise RuntimeError(f'{type(self.taps).__name__}: stage {self.taps.modules[pos]} ran before a shallower '
                               f'tapped stage; Tf-FD needs the stages in forward order')
        return {name: fn.at_tap(pos, feature, [earlier[p][name] for p in range(pos)])
                for name, fn in self.staged.items()}

    def peek(self) -> Optional[TfFDStash]:
        """What the last training forward left, without taking it (``None`` once taken)."""
        return self.stash

    def take(self) -> Optional[TfFDStash]:
        """What the last training forward left; the criterion takes it exactly once."""
        stash, self.stash = self.stash, None
        return stash

    def __getstate__(self):
        state = self.__dict__.copy()
        state['stash'] = None  # deep copies (EMA) and pickles never carry live activations
        return state


def _tffd_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state: TfFDState = getattr(self, _ATTR)
    if not self.training:
        return type(self).forward(self, x)
    staged = {}
    logits, feats = state.taps.forward(self, x, staged)
    record_forward(self, logits, feats, staged)
    return logits


def record_forward(
        model: nn.Module,
        output,
        features: List[torch.Tensor],
        staged: Optional[Dict[int, Dict[str, object]]] = None,
):
    """Compute the Tf-FD terms of a training forward and leave them, with its ``output``, for ``TfFDLoss``.

    The wrapped ``forward`` calls it; so does a task that runs the model its own way (timm's feature distillation
    applies the head itself) with the maps of ``get_tffd_state(model).taps.forward_features``. ``staged``: what the
    taps' ``on_tap`` computed during that forward (``{position: {method: part}}``); without it, or in a forward that
    did not tap with hooks, every term is computed from the maps here.
    """
    state = get_tffd_state(model)
    terms = {}
    for name, fn in state.methods.items():
        if name in state.staged and staged:
            terms[name] = fn(features, [staged[pos][name] for pos in range(len(features))])
        else:
            terms[name] = fn(features)
    state.stash = TfFDStash(output, terms, list(features) if state.keep_features else None)


def wrap(
        model: nn.Module,
        tffd: Union[str, Sequence[str], TfFDConfig] = 'inter,intra',
        stages: Optional[Sequence[int]] = None,
        preact: bool = False,
        weights: Optional[Dict[str, float]] = None,
        warmup_epochs: float = 20,
        decay: Optional[Sequence[float]] = None,
        **options,
) -> nn.Module:
    """Add Tf-FD to a timm model, in place; returns the same model.

    Args:
        model: A timm model with ``feature_info``.
        tffd: Comma-separated method names (or a list): ``inter``, ``intra`` and any registered method; or a whole
            ``TfFDConfig`` (then no other setting may be given).
        stages: ``feature_info`` indices to tap, shallow to deep; default every entry but the stem.
        preact: Tap stage outputs before their closing ReLU (ResNet-style stages).
        weights: ``{method: lambda}``; methods not named keep their registered default.
        warmup_epochs: Linear warm-up of the weights in epochs (20 in the reference code; 0 for none).
        decay: ``(start, end)`` epochs of an early decay of the weights, or ``None``.
        **options: Method options, e.g. ``pairs``, ``direction`` (inter), ``saliency``, ``detach_salient`` (intra).
    """
    if isinstance(tffd, TfFDConfig):
        given = dict(stages=stages, preact=preact, weights=weights, warmup_epochs=warmup_epochs, decay=decay)
        defaults = {k: p.default for k, p in inspect.signature(wrap).parameters.items() if k in given}
        if options or given != defaults:
            raise ValueError('wrap() takes either a TfFDConfig or separate settings, not both')
        config = tffd
    else:
        config = TfFDConfig(tffd, stages=stages, preact=preact, options=options, weights=weights or {},
                            warmup_epochs=warmup_epochs, decay=decay)
    model = unwrap_model(model)
    if is_wrapped(model):
        raise ValueError('model is already wrapped with Tf-FD; call timm_tffd.unwrap(model) first')
    if 'forward' in vars(model):
        raise ValueError('model already has an instance-level forward; Tf-FD cannot wrap it')
    taps = FeatureTaps(model, config.stages, preact=config.preact)
    ctx = MethodContext(model, taps.indices, taps.modules, taps.channels, taps.reductions, copies=taps.mode == 'preact',
                        token_views=bool(taps.token_grid))
    try:
        methods = {}
        for name in config.methods:
            method = get_method(name)
            methods[name] = method.build(ctx, **{k: config.options[k] for k in method.options()})
    except Exception:
        taps.remove()
        raise
    setattr(model, _ATTR, TfFDState(config, taps, methods))
    model.forward = functools.partial(_tffd_forward, model)  # unlike a bound method, survives torch.save(model)
    return model


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), _ATTR)


def tapped_features(model: nn.Module) -> List[torch.Tensor]:
    """The stage maps tapped by the last training forward of a wrapped model, shallow to deep, before its criterion
    has taken them (what SFD's integrator reads from the same pass). Needs ``get_tffd_state(model).keep_features``."""
    state = get_tffd_state(model)
    if not state.keep_features:
        raise RuntimeError('the wrapped model does not keep its tapped maps: set '
                           'timm_tffd.get_tffd_state(model).keep_features = True before its forward')
    stash = state.peek()
    if stash is None:
        raise RuntimeError('no Tf-FD features: call the wrapped model in train() mode first')
    return stash.features


def nonfinite_stages(taps: FeatureTaps, features: Sequence[torch.Tensor]) -> List[str]:
    """``'index:module'`` of the tapped stages whose maps hold a non-finite value."""
    return [f'{i}:{m}' for f, i, m in zip(features, taps.indices, taps.modules)
            if not bool(torch.isfinite(f.detach()).all())]


@torch.no_grad()
def diagnose_nonfinite(model: nn.Module, x: torch.Tensor) -> List[str]:
    """The tapped stages of a wrapped model whose maps are not finite for input ``x``: one training-mode forward of a
    copy of the model (the model itself and its BatchNorm statistics are left alone). For an error message."""
    inner = copy.deepcopy(unwrap_model(model)).train()
    state = get_tffd_state(inner)
    _, feats = state.taps.forward(inner, x)
    return nonfinite_stages(state.taps, feats)


def get_tffd_state(model: nn.Module) -> TfFDState:
    """The Tf-FD state of a wrapped model (looking through DDP / torch.compile wrappers)."""
    inner = unwrap_model(model)
    if not hasattr(inner, _ATTR):
        raise ValueError(f'{type(inner).__name__} is not wrapped with Tf-FD; call timm_tffd.wrap(model) first')
    return getattr(inner, _ATTR)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove Tf-FD from a wrapped model, in place; returns the plain timm model."""
    inner = unwrap_model(model)
    state = get_tffd_state(inner)
    state.taps.remove()
    del inner.forward
    delattr(inner, _ATTR)
    return inner

"""``wrap()`` / ``unwrap()``: turn a timm model into a Tf-FD model in place, without changing what it is.

The wrapped model is the same object: same class, same ``state_dict`` keys and values, same parameters (so timm's
optimizer factories, EMA, checkpoint saver and hub helpers see a plain timm model). Only its ``forward`` changes, and
only in training mode: it taps the selected stages in the same pass that produces the logits, computes the unweighted
Tf-FD terms, and leaves them for ``TfFDLoss`` to take exactly once. In eval mode the class's own forward runs
untouched.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.utils.model import unwrap_model

from .features import FeatureTaps
from .losses.sink import sink_features
from .methods import MethodContext, get_method, method_options, parse_methods

__all__ = ['wrap', 'unwrap', 'is_wrapped', 'get_tffd_state', 'TfFDState', 'TfFDStash']

_ATTR = '_tffd_state'


@dataclass
class TfFDStash:
    """What one training forward leaves for the criterion."""
    output: torch.Tensor
    terms: Dict[str, torch.Tensor]
    features: List[torch.Tensor]


class TfFDState:
    """Per-model Tf-FD state. A plain object, so it adds nothing to ``state_dict``."""

    def __init__(self, taps: FeatureTaps, methods: Dict[str, object], config: dict):
        self.taps = taps
        self.methods = methods
        # Autograd runs the node created last first. Terms whose backward writes whole maps at once (inter: its
        # pooling and its runs of equal-shape maps; m2o) are computed last: their gradients fill the maps' buffers
        # first and the other terms' (intra's, by channel index) are added into them in place.
        self.compute_order = sorted(methods, key=lambda n: getattr(methods[n], 'fused_backward', False))
        self.config = config
        self.stash: Optional[TfFDStash] = None

    def take(self) -> Optional[TfFDStash]:
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
    logits, feats = state.taps.forward(self, x)
    shared = sink_features(feats)  # one gradient buffer per map for all terms (see timm_tffd.losses.sink)
    computed = {name: state.methods[name](shared) for name in state.compute_order}  # see TfFDState
    terms = {name: computed[name] for name in state.methods}
    state.stash = TfFDStash(logits, terms, feats)
    return logits


def wrap(
        model: nn.Module,
        tffd='inter,intra',
        stages: Optional[Sequence[int]] = None,
        preact: bool = False,
        **options,
) -> nn.Module:
    """Add Tf-FD to a timm model, in place; returns the same model.

    Args:
        model: A timm model with ``feature_info``.
        tffd: Comma-separated method names (or a list): ``inter``, ``intra`` and any registered method.
        stages: ``feature_info`` indices to tap, shallow to deep; default every entry but the stem.
        preact: Tap stage outputs before their closing ReLU (ResNet-style stages).
        **options: Method options, e.g. ``pairs``, ``direction`` (inter), ``saliency``, ``detach_salient`` (intra).
    """
    model = unwrap_model(model)
    if is_wrapped(model):
        raise ValueError('model is already wrapped with Tf-FD; call timm_tffd.unwrap(model) first')
    if 'forward' in vars(model):
        raise ValueError('model already has an instance-level forward; Tf-FD cannot wrap it')
    names = parse_methods(tffd)
    known = method_options(names)
    for key in options:
        if key not in known:
            users = [m for m in _all_method_names() if key in get_method(m).options()]
            if users:
                raise ValueError(f'option {key!r} belongs to method(s) {users}, which are not selected in {names}')
            raise ValueError(f'unknown Tf-FD option {key!r}; options of {names}: {sorted(known) or "none"}')
    taps = FeatureTaps(model, stages, preact=preact)
    ctx = MethodContext(model, taps.indices, taps.modules, taps.channels, taps.reductions)
    try:
        methods = {}
        for n in names:
            method = get_method(n)
            kwargs = {k: v for k, v in options.items() if k in method.options()}
            methods[n] = method.build(ctx, **kwargs)
    except Exception:
        taps.remove()
        raise
    config = dict(tffd=names, stages=taps.indices, preact=preact, **{**known, **options})
    setattr(model, _ATTR, TfFDState(taps, methods, config))
    model.forward = _tffd_forward.__get__(model)
    return model


def _all_method_names():
    from .methods import list_methods
    return list_methods()


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), _ATTR)


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

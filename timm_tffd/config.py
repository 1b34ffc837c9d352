"""``TfFDConfig``: every Tf-FD setting of a run in one object.

Built once (from ``wrap()`` arguments, from the training script's flags with ``from_args``, or from a checkpoint's
``task_state['tffd']['config']`` with ``from_dict``) and read by ``wrap``, ``TfFDLoss``, every task, the training
script and the hub model card. Construction validates and fills in defaults, so a config that exists is a valid one.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

from .methods import get_method, list_methods, parse_methods

__all__ = ['TfFDConfig']


@dataclass
class TfFDConfig:
    """The Tf-FD settings of a wrapped model and its loss.

    Args:
        methods: Method names, shallow to deep terms summed: ``'inter,intra'`` or a sequence (``inter``, ``intra``,
            ``emd``, ``m2o`` and any registered method).
        stages: ``feature_info`` indices to tap, shallow to deep; ``None`` taps every entry but a leading stem.
        preact: Tap stage outputs before their closing ReLU (ResNet-style stages).
        options: Method options by name (``pairs``, ``direction``, ``saliency``, ``detach_salient``, ``emd_grid``,
            ...); each must belong to a selected method. Missing options take the method's default.
        weights: ``{method: lambda}``; missing methods take their registered default weight (inter 0.005 and intra
            0.0004, the reference code's defaults).
        warmup_epochs: Linear warm-up of the weights, ``min(1, (epoch + 1) / warmup_epochs)``; 20 in the reference
            code, 0 for none.
        decay: ``(start, end)`` epochs of an early decay: the weights fall linearly to 0 between them (the Tf-FD
            supplementary names an early decay on ImageNet without defining it). ``None``: no decay.
    """
    methods: Union[str, Sequence[str]] = ('inter', 'intra')
    stages: Optional[Sequence[int]] = None
    preact: bool = False
    options: Dict[str, Any] = field(default_factory=dict)
    weights: Dict[str, float] = field(default_factory=dict)
    warmup_epochs: float = 20
    decay: Optional[Sequence[float]] = None

    def __post_init__(self):
        self.methods = tuple(parse_methods(self.methods))
        if self.stages is not None:
            self.stages = tuple(self.stages)
        self.preact = bool(self.preact)
        self.options = self._resolve_options(dict(self.options))
        self.weights = self._resolve_weights(dict(self.weights))
        self.warmup_epochs = float(self.warmup_epochs)
        if not self.warmup_epochs >= 0:
            raise ValueError(f'warmup_epochs must be >= 0, got {self.warmup_epochs}')
        if self.decay is not None:
            decay = tuple(float(d) for d in self.decay)
            if len(decay) != 2 or not 0 <= decay[0] < decay[1]:
                raise ValueError(f'decay must be (start, end) epochs with 0 <= start < end, got {self.decay}')
            self.decay = decay

    def _resolve_options(self, given: Dict[str, Any]) -> Dict[str, Any]:
        out = {}
        for name in self.methods:
            out.update(get_method(name).options())
        for key, value in given.items():
            if key not in out:
                users = [m for m in list_methods() if key in get_method(m).options()]
                if users:
                    raise ValueError(f'option {key!r} belongs to method(s) {users}, which are not selected in '
                                     f'{list(self.methods)}')
                raise ValueError(f'unknown Tf-FD option {key!r}; options of {list(self.methods)}: '
                                 f'{sorted(out) or "none"}')
            out[key] = value
        return out

    def _resolve_weights(self, given: Dict[str, float]) -> Dict[str, float]:
        unknown = [m for m in given if m not in self.methods]
        if unknown:
            raise ValueError(f'weight given for {unknown}, which are not among the selected methods '
                             f'{list(self.methods)}')
        out = {}
        for name in self.methods:
            w = float(given.get(name, get_method(name).default_weight))
            if not w >= 0:  # also rejects NaN
                raise ValueError(f'Tf-FD weight for {name!r} must be >= 0, got {w}')
            out[name] = w
        return out

    def multiplier(self, epoch: float) -> float:
        """The weight schedule at (0-based, possibly fractional) ``epoch``: warm-up times early decay."""
        w = 1.0 if self.warmup_epochs == 0 else min(1.0, (epoch + 1) / self.warmup_epochs)
        if self.decay is not None:
            start, end = self.decay
            w *= min(1.0, max(0.0, (end - epoch) / (end - start)))
        return w

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values (lists, dicts, numbers), as saved in ``task_state['tffd']['config']``."""
        out = asdict(self)
        for key in ('methods', 'stages', 'decay'):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> 'TfFDConfig':
        return cls(**state)

    @classmethod
    def from_args(cls, args) -> Optional['TfFDConfig']:
        """The config the training script's flags describe (``args.tffd``, ``args.tffd_<method>_weight``,
        ``args.tffd_<option>``, ``args.tffd_stages``, ...); ``None`` when ``args.tffd`` is empty.

        A flag set away from its default for a method that is not selected is an error, as is any Tf-FD flag without
        ``--tffd``.
        """
        defaults = cls.flag_defaults()
        changed = {key: getattr(args, key) for key, default in defaults.items()
                   if hasattr(args, key) and _normalize(getattr(args, key)) != _normalize(default)}
        if not getattr(args, 'tffd', None):
            if changed:
                flags = ', '.join('--' + k.replace('_', '-') for k in changed)
                raise ValueError(f'{flags}: Tf-FD options, which need --tffd (e.g. --tffd inter,intra)')
            return None
        methods = parse_methods(args.tffd)
        weights, options = {}, {}
        for name in list_methods():
            key = f'tffd_{name}_weight'
            if name in methods:
                weights[name] = getattr(args, key, get_method(name).default_weight)
            elif key in changed:
                raise ValueError(f'--{key.replace("_", "-")} needs {name} in --tffd (got --tffd {args.tffd})')
        for option in _all_options():
            key = f'tffd_{option}'
            if any(option in get_method(m).options() for m in methods):
                if hasattr(args, key):
                    options[option] = getattr(args, key)
            elif key in changed:
                users = [m for m in list_methods() if option in get_method(m).options()]
                raise ValueError(f'--{key.replace("_", "-")} needs {" or ".join(users)} in --tffd '
                                 f'(got --tffd {args.tffd})')
        return cls(methods, stages=getattr(args, 'tffd_stages', None), preact=getattr(args, 'tffd_preact', False),
                   options=options, weights=weights, warmup_epochs=getattr(args, 'tffd_warmup_epochs', 20),
                   decay=getattr(args, 'tffd_early_decay', None))

    @staticmethod
    def flag_defaults() -> Dict[str, Any]:
        """Default of every training-script Tf-FD flag, by ``args`` attribute (``tffd_<method>_weight``,
        ``tffd_<option>``, ``tffd_stages``, ``tffd_preact``, ``tffd_warmup_epochs``, ``tffd_early_decay``)."""
        base = TfFDConfig.__dataclass_fields__
        out = {'tffd_stages': base['stages'].default, 'tffd_preact': base['preact'].default,
               'tffd_warmup_epochs': base['warmup_epochs'].default, 'tffd_early_decay': base['decay'].default}
        for name in list_methods():
            out[f'tffd_{name}_weight'] = get_method(name).default_weight
        out.update({f'tffd_{k}': v for k, v in _all_options().items()})
        return out


def _all_options() -> Dict[str, Any]:
    out = {}
    for name in list_methods():
        out.update(get_method(name).options())
    return out


def _normalize(value):
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value

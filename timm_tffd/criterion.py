"""``TfFDLoss``: any classification loss plus the weighted Tf-FD terms of the same forward pass.

``loss = base(logits, target) + w(epoch) * sum_m lambda_m * term_m`` (seed 000 / the reference code), where
``w(epoch)`` is the linear warm-up ``min(1, (epoch + 1) / warmup_epochs)`` of the reference code (its epochs count
from 1, timm's from 0) times an optional early decay.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .methods import get_method
from .wrap import get_tffd_state

__all__ = ['TfFDLoss', 'TfFDSchedule']


class TfFDSchedule:
    """Epoch-dependent multiplier of the Tf-FD terms.

    Args:
        warmup_epochs: Linear warm-up length; ``w = min(1, (epoch + 1) / warmup_epochs)``. 20 in the reference code.
            0 disables it.
        decay: ``(start, end)`` epochs of the early decay (seed 003 names the schedule without defining it): the
            multiplier falls linearly from 1 at ``start`` to 0 at ``end`` and stays 0 afterwards. ``None``: no decay.
    """

    def __init__(self, warmup_epochs: float = 20, decay: Optional[Tuple[float, float]] = None):
        if warmup_epochs < 0:
            raise ValueError(f'warmup_epochs must be >= 0, got {warmup_epochs}')
        if decay is not None:
            decay = tuple(float(d) for d in decay)
            if len(decay) != 2 or not 0 <= decay[0] < decay[1]:
                raise ValueError(f'decay must be (start, end) epochs with 0 <= start < end, got {decay}')
        self.warmup_epochs = warmup_epochs
        self.decay = decay

    def __call__(self, epoch: float) -> float:
        w = 1.0 if self.warmup_epochs == 0 else min(1.0, (epoch + 1) / self.warmup_epochs)
        if self.decay is not None:
            start, end = self.decay
            w *= min(1.0, max(0.0, (end - epoch) / (end - start)))
        return w


class TfFDLoss(nn.Module):
    """Wraps a classification loss with the Tf-FD terms of a wrapped model.

    Args:
        base_loss: Any ``loss(logits, target) -> scalar`` (CrossEntropy, LabelSmoothingCrossEntropy,
            SoftTargetCrossEntropy, BinaryCrossEntropy, ...).
        model: The model returned by ``timm_tffd.wrap()`` (DDP / compiled wrappers are looked through).
        weights: ``{method: lambda}``; methods not named keep their registered default.
        warmup_epochs: See ``TfFDSchedule``.
        decay: See ``TfFDSchedule``.
        check_finite: Raise ``FloatingPointError`` naming the stage when a Tf-FD term is not finite (one host sync
            per step).
    """

    def __init__(
            self,
            base_loss: nn.Module,
            model: nn.Module,
            weights: Optional[Dict[str, float]] = None,
            warmup_epochs: float = 20,
            decay: Optional[Sequence[float]] = None,
            check_finite: bool = True,
    ):
        super().__init__()
        self.base_loss = base_loss
        state = get_tffd_state(model)
        self._state = state
        self.method_names = list(state.methods)
        weights = dict(weights or {})
        for name in weights:
            if name not in self.method_names:
                raise ValueError(f'weight given for {name!r}, which is not among the wrapped methods '
                                 f'{self.method_names}')
        self.weights = {}
        for name in self.method_names:
            w = float(weights.get(name, get_method(name).default_weight))
            if not w >= 0:  # also rejects NaN
                raise ValueError(f'Tf-FD weight for {name!r} must be >= 0, got {w}')
            self.weights[name] = w
        self.schedule = TfFDSchedule(warmup_epochs, decay)
        self.check_finite = check_finite
        self.epoch = 0.

    def set_epoch(self, epoch: float):
        """Set the (0-based, possibly fractional) epoch read by the weight schedule and by an epoch-aware base loss."""
        self.epoch = float(epoch)
        if hasattr(self.base_loss, 'set_epoch'):
            self.base_loss.set_epoch(epoch)

    @property
    def multiplier(self) -> float:
        return self.schedule(self.epoch)

    def compute(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return ``loss``, ``base_loss`` and the unweighted term of every method (``tffd_<name>``)."""
        stash = self._state.take()
        if stash is None or stash.output is not output:
            raise RuntimeError(
                'TfFDLoss needs the output of a fresh training-mode forward of the wrapped model: call model(x) in '
                'train() mode, then the criterion once on that output (Tf-FD terms are never reused)')
        base = self.base_loss(output, target)
        if self.check_finite:
            self._check_finite(stash)
        w = self.multiplier
        total = base
        for name, term in stash.terms.items():
            total = total + (w * self.weights[name]) * term
        out = {'loss': total, 'base_loss': base}
        out.update({f'tffd_{name}': term for name, term in stash.terms.items()})
        return out

    def _check_finite(self, stash):
        terms = torch.stack([t.detach().float() for t in stash.terms.values()])
        if bool(torch.isfinite(terms).all()):
            return
        taps = self._state.taps
        bad = [f'{i}:{m}' for f, i, m in zip(stash.features, taps.indices, taps.modules)
               if not bool(torch.isfinite(f.detach()).all())]
        names = [n for n, t in stash.terms.items() if not bool(torch.isfinite(t.detach()).all())]
        where = f'non-finite values in stage(s) {bad}' if bad else 'finite features but an overflowing loss'
        raise FloatingPointError(f'Tf-FD term(s) {names} are not finite: {where}. Lower the learning rate or the '
                                 f'Tf-FD weights, or train in float32.')

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.compute(output, target)['loss']

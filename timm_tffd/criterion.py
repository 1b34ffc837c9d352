"""``TfFDLoss``: any classification loss plus the weighted Tf-FD terms of the same forward pass.

``loss = base(logits, target) + w(epoch) * sum_m lambda_m * term_m`` (Tf-FD (Li, ECCV 2022) as in the reference
code), where ``w(epoch)`` is the linear warm-up ``min(1, (epoch + 1) / warmup_epochs)`` of the reference code (its
epochs count from 1, timm's from 0) times an optional early decay. The weights and the schedule come from the wrapped
model's ``TfFDConfig``.
"""
import logging
from typing import Any, Dict

import torch
import torch.nn as nn

from .config import TfFDConfig
from .wrap import get_tffd_state, nonfinite_stages

__all__ = ['TfFDLoss']

_logger = logging.getLogger(__name__)


class TfFDLoss(nn.Module):
    """Wraps a classification loss with the Tf-FD terms of a wrapped model.

    Args:
        base_loss: Any ``loss(logits, target) -> scalar`` (CrossEntropy, LabelSmoothingCrossEntropy,
            SoftTargetCrossEntropy, BinaryCrossEntropy, ...).
        model: The model returned by ``timm_tffd.wrap()`` (DDP / compiled wrappers are looked through); its
            ``TfFDConfig`` gives the weights and their schedule.
        check_finite: Raise ``FloatingPointError`` at once, naming the stages, when a Tf-FD term is not finite. It
            reads the terms on the host every step (a stall on GPU), so it is off by default: a training loop finds
            non-finite terms where it reads its loss values anyway (the training script's log interval). It also
            makes the model keep its tapped maps for the message (``TfFDState.keep_features``).
    """

    def __init__(self, base_loss: nn.Module, model: nn.Module, check_finite: bool = False):
        super().__init__()
        self.base_loss = base_loss
        self.state = get_tffd_state(model)
        self.check_finite = check_finite
        if check_finite:
            self.state.keep_features = True
        self.epoch = 0.

    @property
    def config(self) -> TfFDConfig:
        return self.state.config

    @property
    def weights(self) -> Dict[str, float]:
        return self.config.weights

    def set_epoch(self, epoch: float):
        """Set the (0-based, possibly fractional) epoch read by the weight schedule and by an epoch-aware base loss."""
        self.epoch = float(epoch)
        if hasattr(self.base_loss, 'set_epoch'):
            self.base_loss.set_epoch(epoch)

    @property
    def multiplier(self) -> float:
        """The schedule's factor on every weight at the current epoch."""
        return self.config.multiplier(self.epoch)

    def regularization(self, output: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The Tf-FD part of the loss for the forward that produced ``output``: ``tffd`` (the weighted sum) and the
        unweighted term of every method (``tffd_<name>``). Takes that forward's terms; call it once per forward."""
        stash = self.state.take()
        produced = stash.output if stash is not None else None
        if isinstance(produced, (tuple, list)):  # (main, distillation) logits of a distillation-token model
            produced = produced[0]
        if stash is None or produced is not output:
            raise RuntimeError(
                'TfFDLoss needs the output of a fresh training-mode forward of the wrapped model: call model(x) in '
                'train() mode, then the criterion once on that output (Tf-FD terms are never reused)')
        if self.check_finite:
            self._check_finite(stash)
        w = self.multiplier
        total = sum((w * self.weights[name]) * term for name, term in stash.terms.items())
        out = {'tffd': total}
        out.update({f'tffd_{name}': term for name, term in stash.terms.items()})
        return out

    def compute(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return ``loss``, ``base_loss``, ``tffd`` (the weighted terms) and the unweighted ``tffd_<name>``."""
        reg = self.regularization(output)
        base = self.base_loss(output, target)
        return {'loss': base + reg['tffd'], 'base_loss': base, **reg}

    def _check_finite(self, stash):
        terms = torch.stack([t.detach().float() for t in stash.terms.values()])
        if bool(torch.isfinite(terms).all()):
            return
        bad = nonfinite_stages(self.state.taps, stash.features)
        names = [n for n, t in stash.terms.items() if not bool(torch.isfinite(t.detach()).all())]
        where = f'non-finite values in stage(s) {bad}' if bad else 'finite features but an overflowing loss'
        raise FloatingPointError(f'Tf-FD term(s) {names} are not finite: {where}. Lower the learning rate or the '
                                 f'Tf-FD weights, or train in float32.')

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.compute(output, target)['loss']

    def task_state(self) -> Dict[str, Any]:
        """What a checkpoint keeps: ``{'config': TfFDConfig.to_dict(), 'epoch': float}`` (``task_state['tffd']``)."""
        return {'config': self.config.to_dict(), 'epoch': self.epoch}

    def load_task_state(self, state: Dict[str, Any]):
        """Restore the epoch; a warning names the settings that differ from the checkpoint's (they stay as set)."""
        saved = TfFDConfig.from_dict(state['config'])
        if saved != self.config:
            changed = {k: (v, getattr(self.config, k)) for k, v in vars(saved).items() if getattr(self.config, k) != v}
            _logger.warning(f'Tf-FD settings differ from the checkpoint (saved, now): {changed}')
        self.set_epoch(state['epoch'])

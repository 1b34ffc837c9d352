"""Dynamic label smoothing: a smoothing value that changes during training (SFR (Fan, 2021)).

The loss is timm's ``LabelSmoothingCrossEntropy`` with a value ``eps`` that is no longer fixed:
``loss = (1 - eps) * CE(p, target) + eps * CE(p, uniform)``, averaged over the batch. Schedules:

* ``constant``: ``eps = smoothing`` (exactly timm's ``LabelSmoothingCrossEntropy``).
* ``linear`` / ``cosine``: from ``smoothing`` at the first epoch to ``smoothing_end`` at the last,
  ``eps = end + (start - end) * (1 - t)`` or ``end + (start - end) * (1 + cos(pi t)) / 2`` with
  ``t = min(1, epoch / (epochs - 1))``; the epoch comes from ``set_epoch`` (0-based, fractions allowed).
* ``adaptive``: per sample, ``eps_i = smoothing * p_i`` where ``p_i`` is the model's current (detached) probability of
  the target (``sum_k t_k p_k`` for soft targets): samples the model already fits confidently are smoothed the most,
  samples it still gets wrong (small ``p_i``) are trained on nearly the plain one-hot target.

SFR names the method without defining it. The default here is the epoch schedule, linear from ``smoothing`` to 0; the
confidence-adaptive variant is the other reading of "dynamic" (docs/sfr.md says why).

Targets are class indices or, as produced by timm's Mixup / CutMix, per-class probabilities (B, K); the smoothing is
then applied to the mixed target, so build Mixup with ``label_smoothing=0`` to avoid smoothing twice.
"""
import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DynamicLabelSmoothingCrossEntropy', 'label_smoothing_cross_entropy', 'scheduled_smoothing', 'SCHEDULES']

SCHEDULES = ('constant', 'linear', 'cosine', 'adaptive')


def _check_unit(name: str, value: float):
    if not 0. <= value < 1.:  # also rejects NaN
        raise ValueError(f'{name} must be in [0, 1), got {value}')


def scheduled_smoothing(
        epoch: float,
        smoothing: float,
        smoothing_end: float,
        epochs: int,
        schedule: str = 'linear',
) -> float:
    """The smoothing value of a ``linear`` or ``cosine`` schedule at ``epoch`` (0-based; clamped to the schedule).

    Args:
        epoch: Current epoch; ``0`` gives ``smoothing``, ``epochs - 1`` and later give ``smoothing_end``.
        smoothing: Start value.
        smoothing_end: End value.
        epochs: Number of training epochs.
        schedule: ``'linear'`` or ``'cosine'``.
    """
    t = min(1., max(0., epoch / max(1, epochs - 1)))
    if schedule == 'linear':
        shape = 1. - t
    elif schedule == 'cosine':
        shape = 0.5 * (1. + math.cos(math.pi * t))
    else:
        raise ValueError(f'scheduled_smoothing takes a linear or cosine schedule, got {schedule!r}')
    return smoothing_end + (smoothing - smoothing_end) * shape


def label_smoothing_cross_entropy(
        logits: torch.Tensor,
        target: torch.Tensor,
        smoothing: Union[float, torch.Tensor],
) -> torch.Tensor:
    """``(1 - eps) * CE(target) + eps * CE(uniform)``, averaged over the batch.

    Args:
        logits: (B, K) logits.
        target: (B,) class indices or (B, K) class probabilities.
        smoothing: A float, or one value per sample (B,).
    """
    logprobs = F.log_softmax(logits, dim=-1)
    if target.ndim == logits.ndim:
        nll = -(target * logprobs).sum(-1)
    else:
        nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    uniform = -logprobs.mean(-1)
    return ((1. - smoothing) * nll + smoothing * uniform).mean()


class DynamicLabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy with a scheduled or confidence-adaptive label smoothing value (see the module docstring).

    Call ``set_epoch(epoch)`` at the start of every epoch; ``TfFDLoss.set_epoch`` and the Tf-FD tasks forward it.

    Args:
        smoothing: Start value (``constant``, ``linear``, ``cosine``) or the per-sample maximum (``adaptive``), in
            [0, 1).
        smoothing_end: End value of ``linear`` / ``cosine``, in [0, 1); ``None`` means 0. Not used by the others.
        schedule: ``'constant'``, ``'linear'`` (default), ``'cosine'`` or ``'adaptive'``.
        epochs: Training epochs; needed by ``linear`` and ``cosine``.
    """

    def __init__(
            self,
            smoothing: float = 0.1,
            smoothing_end: Optional[float] = None,
            schedule: str = 'linear',
            epochs: Optional[int] = None,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f'unknown label smoothing schedule {schedule!r}; choose from {", ".join(SCHEDULES)}')
        _check_unit('smoothing', smoothing)
        if schedule in ('linear', 'cosine'):
            smoothing_end = 0. if smoothing_end is None else smoothing_end
            _check_unit('smoothing_end', smoothing_end)
            if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
                raise ValueError(f'the {schedule} smoothing schedule needs epochs >= 1, got {epochs!r}')
        elif smoothing_end is not None:
            raise ValueError(f'smoothing_end applies to the linear and cosine schedules, not to {schedule!r}')
        self.start = smoothing
        self.end = smoothing_end
        self.schedule = schedule
        self.epochs = epochs
        self.epoch = 0.

    def set_epoch(self, epoch: float):
        """Set the (0-based, possibly fractional) epoch read by the schedule."""
        self.epoch = float(epoch)

    @property
    def smoothing(self) -> float:
        """The current smoothing value (for ``adaptive``: its per-sample maximum)."""
        if self.schedule in ('constant', 'adaptive'):
            return self.start
        return scheduled_smoothing(self.epoch, self.start, self.end, self.epochs, self.schedule)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.smoothing
        if self.schedule == 'adaptive':
            with torch.no_grad():
                probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
                if target.ndim == logits.ndim:
                    confidence = (probs * target).sum(-1)
                else:
                    confidence = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            smoothing = smoothing * confidence
        return label_smoothing_cross_entropy(logits, target, smoothing)

    def extra_repr(self) -> str:
        return f'smoothing={self.start}, smoothing_end={self.end}, schedule={self.schedule!r}, epochs={self.epochs}'

"""Tf-FD together with logit knowledge distillation from a teacher (seed 001, the TFD+KD column).

``TfFDLogitDistillationTask`` is timm's ``LogitDistillationTask`` with a Tf-FD-wrapped student: timm's code creates
the teacher (``DistillationTeacher``: from a name, a module or a checkpoint), converts the input normalization, and
computes the distillation term and its weighting. This module only adds the Tf-FD terms of the same student forward:

    loss = task_loss_weight * CE(student, target)
         + distill_loss_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + w(epoch) * sum_m lambda_m * tffd_m

The Tf-FD terms are added outside timm's two weights, so ``task_loss_weight`` scales the classification loss alone
(as in a Tf-FD run without a teacher) and not the teacher-free regularizers.
"""
import logging
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, LogitDistillationTask

from .criterion import TfFDLoss
from .task import TfFDTask
from .wrap import is_wrapped, wrap

__all__ = ['TfFDLogitDistillationTask']

_logger = logging.getLogger(__name__)


class _BaseLossOfTfFD(TfFDLoss):
    """A ``TfFDLoss`` whose call returns only the base loss and keeps the whole result for ``pop_result``.

    ``LogitDistillationTask.forward`` calls its criterion once per step and weights what it returns as the task
    loss; the task then adds the Tf-FD terms of that same call.
    """
    _result: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._result = self.compute(output, target)
        return self._result['base_loss']

    def pop_result(self) -> Dict[str, torch.Tensor]:
        result, self._result = self._result, None
        return result


class TfFDLogitDistillationTask(LogitDistillationTask):
    """Logit distillation from a teacher plus Teacher-free Feature Distillation on the student.

    The returned dict has timm's ``loss``, ``output``, ``task_loss`` (the base classification loss) and ``kd_loss``
    (the unweighted distillation term), plus the unweighted ``tffd_<method>`` terms.

    Args:
        student_model: A timm model; wrapped here unless already wrapped.
        teacher_model: A model name, an ``nn.Module`` or a ``DistillationTeacher`` (see ``LogitDistillationTask``).
        criterion: The base classification loss; ``None`` creates one from ``criterion_kwargs``.
        tffd: Method names, e.g. ``'inter,intra'``.
        weights: ``{method: lambda}``; unnamed methods keep their registered default.
        warmup_epochs: Linear warm-up of the Tf-FD weight (epochs).
        decay: ``(start, end)`` early-decay epochs of the Tf-FD weight, or ``None``.
        stages: ``feature_info`` indices to tap.
        preact: Tap pre-activation stage outputs.
        method_options: Options routed to the methods (``pairs``, ``saliency``, ``grid``, ...).
        check_finite: See ``TfFDLoss``.
        criterion_kwargs, teacher_pretrained_path, teacher_pretrained_cfg_overlay, loss_type, distill_loss_weight,
        task_loss_weight, temperature, device, dtype, verbose: As in ``LogitDistillationTask``.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[nn.Module] = None,
            tffd='inter,intra',
            weights: Optional[Dict[str, float]] = None,
            warmup_epochs: float = 20,
            decay: Optional[Sequence[float]] = None,
            stages: Optional[Sequence[int]] = None,
            preact: bool = False,
            method_options: Optional[Dict[str, Any]] = None,
            check_finite: bool = True,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            teacher_pretrained_path: Optional[str] = None,
            teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
            loss_type: str = 'kl',
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            temperature: float = 1.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if not is_wrapped(student_model):
            student_model = wrap(student_model, tffd, stages=stages, preact=preact, **(method_options or {}))
        super().__init__(
            student_model,
            teacher_model,
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            teacher_pretrained_path=teacher_pretrained_path,
            teacher_pretrained_cfg_overlay=teacher_pretrained_cfg_overlay,
            loss_type=loss_type,
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            temperature=temperature,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
        self.criterion = _BaseLossOfTfFD(self.criterion, student_model, weights, warmup_epochs, decay, check_finite)
        if verbose:
            _logger.info(f'TfFDLogitDistillationTask: methods={self.criterion.weights}, '
                         f'warmup_epochs={warmup_epochs}, decay={decay}')

    # the Tf-FD epoch and checkpoint state are those of TfFDTask
    set_epoch = TfFDTask.set_epoch
    get_task_state = TfFDTask.get_task_state
    load_task_state = TfFDTask.load_task_state

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        result = super().forward(input, target)  # student, teacher, task loss and distillation term, timm-weighted
        tffd = self.criterion.pop_result()
        result['loss'] = result['loss'] + (tffd['loss'] - tffd['base_loss'])
        result.update({k: v for k, v in tffd.items() if k.startswith('tffd_')})
        return result

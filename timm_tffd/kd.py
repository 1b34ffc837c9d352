"""Tf-FD together with logit knowledge distillation from a teacher (the TFD + KD setting of TFD, Li et al., IJCNN 2022).

``TfFDLogitDistillationTask`` is timm's ``LogitDistillationTask`` with a Tf-FD-wrapped student: timm's code creates
the teacher (``DistillationTeacher``: from a name, a module or a checkpoint), converts the input normalization, and
computes the distillation term and its weighting. This module only adds the Tf-FD terms of the same student forward:

    loss = task_loss_weight * CE(student, target)
         + distill_loss_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + w(epoch) * sum_m lambda_m * tffd_m

The Tf-FD terms are added outside timm's two weights, so ``task_loss_weight`` scales the classification loss alone
(as in a Tf-FD run without a teacher) and not the teacher-free regularizers.
"""
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, LogitDistillationTask

from .criterion import TfFDLoss
from .task import TfFDSetting, TfFDTaskMixin, wrap_student

__all__ = ['TfFDLogitDistillationTask']


class TfFDLogitDistillationTask(TfFDTaskMixin, LogitDistillationTask):
    """Logit distillation from a teacher plus Teacher-free Feature Distillation on the student.

    The returned dict has timm's ``loss``, ``output``, ``task_loss`` (the base classification loss) and ``kd_loss``
    (the unweighted distillation term), plus ``tffd`` (the weighted Tf-FD sum) and the unweighted ``tffd_<method>``
    terms.

    Args:
        student_model: A timm model; wrapped here unless already wrapped.
        teacher_model: A model name, an ``nn.Module`` or a ``DistillationTeacher`` (see ``LogitDistillationTask``).
        criterion: The base classification loss; ``None`` creates one from ``criterion_kwargs``.
        tffd: Method names (``'inter,intra'``) or a ``TfFDConfig`` (see ``TfFDTask``); options such as ``emd_grid``
            go in the config's ``options``.
        check_finite: See ``TfFDLoss``.
        criterion_kwargs, teacher_pretrained_path, teacher_pretrained_cfg_overlay, loss_type, distill_loss_weight,
        task_loss_weight, temperature, device, dtype, verbose: As in ``LogitDistillationTask``.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[nn.Module] = None,
            tffd: TfFDSetting = None,
            check_finite: bool = False,
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
        student_model = wrap_student(student_model, tffd)
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
        self.tffd_loss = TfFDLoss(self.criterion, student_model, check_finite)
        if verbose:
            self._log_tffd('TfFDLogitDistillationTask')

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        result = super().forward(input, target)  # student, teacher, task loss and distillation term, timm-weighted
        tffd = self.tffd_loss.regularization(result['output'])
        result['loss'] = result['loss'] + tffd['tffd']
        result.update(tffd)
        return result

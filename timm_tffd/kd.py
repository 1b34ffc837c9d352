"""Tf-FD together with timm's knowledge distillation from a teacher: logit KD (the TFD + KD setting of TFD, Li et al.,
IJCNN 2022), feature KD and token KD.

``TfFDLogitDistillationTask`` is timm's ``LogitDistillationTask`` with a Tf-FD-wrapped student: timm's code creates
the teacher (``DistillationTeacher``: from a name, a module or a checkpoint), converts the input normalization, and
computes the distillation term and its weighting. This module only adds the Tf-FD terms of the same student forward:

    loss = task_loss_weight * CE(student, target)
         + distill_loss_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + w(epoch) * sum_m lambda_m * tffd_m

The Tf-FD terms are added outside timm's two weights, so ``task_loss_weight`` scales the classification loss alone
(as in a Tf-FD run without a teacher) and not the teacher-free regularizers. Feature and token KD the same way, with
timm's distillation term in place of the KL term. timm's feature distillation runs the student up to its head and
applies the head itself; its Tf-FD variant taps the stages in that same pass (``FeatureTaps.forward_features``).
"""
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
from timm.task.distillation import FeatureDistillationTrainableModule

from .criterion import TfFDLoss
from .task import TfFDSetting, TfFDTaskMixin, wrap_student
from .wrap import get_tffd_state, record_forward

__all__ = ['TfFDLogitDistillationTask', 'TfFDFeatureDistillationTask', 'TfFDTokenDistillationTask']


class _TfFDDistillation(TfFDTaskMixin):
    """Adds the Tf-FD terms of the student's forward to a timm distillation task's result."""

    def _add_tffd(self, student_model: nn.Module, check_finite: bool, verbose: bool):
        self.tffd_loss = TfFDLoss(self.criterion, student_model, check_finite)
        if verbose:
            self._log_tffd(type(self).__name__)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        result = super().forward(input, target)  # student, teacher, task loss and distillation term, timm-weighted
        tffd = self.tffd_loss.regularization(result['output'])
        result['loss'] = result['loss'] + tffd['tffd']
        result.update(tffd)
        return result


class TfFDLogitDistillationTask(_TfFDDistillation, LogitDistillationTask):
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
        self._add_tffd(student_model, check_finite, verbose)


class TfFDFeatureDistillationTrainableModule(FeatureDistillationTrainableModule):
    """timm's feature-distillation student module, tapping the Tf-FD stages in the same forward (training mode)."""

    def forward(self, input: torch.Tensor):
        if not self.training:
            return super().forward(input)
        staged = {}
        final, feats = get_tffd_state(self.student).taps.forward_features(self.student, input, staged)
        logits = self.student.forward_head(final)
        features = self.student.forward_head(final, pre_logits=True)
        if self.projection is not None:
            features = self.projection(features)
        record_forward(self.student, logits, feats, staged)
        return logits, features


class TfFDFeatureDistillationTask(_TfFDDistillation, FeatureDistillationTask):
    """timm's ``FeatureDistillationTask`` (MSE between the student's projected and the teacher's pooled features)
    plus Tf-FD on the student. Arguments as ``FeatureDistillationTask``, plus ``tffd`` and ``check_finite`` (see
    ``TfFDLogitDistillationTask``)."""

    def __init__(self, student_model: nn.Module, teacher_model, criterion: Optional[nn.Module] = None,
                 tffd: TfFDSetting = None, check_finite: bool = False, verbose: bool = True, **kwargs):
        student_model = wrap_student(student_model, tffd)
        super().__init__(student_model, teacher_model, criterion=criterion, verbose=verbose, **kwargs)
        self.trainable_module = TfFDFeatureDistillationTrainableModule(
            self.trainable_module.student, self.trainable_module.projection)
        self._add_tffd(student_model, check_finite, verbose)


class TfFDTokenDistillationTask(_TfFDDistillation, TokenDistillationTask):
    """timm's ``TokenDistillationTask`` (a distillation-token student, e.g. DeiT distilled) plus Tf-FD on the student.
    Arguments as ``TokenDistillationTask``, plus ``tffd`` and ``check_finite``."""

    def __init__(self, student_model: nn.Module, teacher_model, criterion: Optional[nn.Module] = None,
                 tffd: TfFDSetting = None, check_finite: bool = False, verbose: bool = True, **kwargs):
        student_model = wrap_student(student_model, tffd)
        super().__init__(student_model, teacher_model, criterion=criterion, verbose=verbose, **kwargs)
        self._add_tffd(student_model, check_finite, verbose)

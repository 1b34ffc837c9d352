"""``SFDTask``: Self-boosting Feature Distillation (seed 004) as a timm ``TrainingTask``.

``loss = base(logits, y) [+ Tf-FD terms] + sfd_weight * L_distill(integrator(student stages), teacher feature)``,
plus the SD / RSD parameter update after every epoch (``on_train_epoch_end``). Each part is optional: with no teacher the task
is SD / RSD (and Tf-FD when the student is wrapped) alone.

The integrator trains inside ``SFDTrainableModule`` with the student (so DDP and the optimizer see it) but is not part
of the exported model: ``get_eval_model`` and the checkpoint's ``state_dict`` are the plain timm student, and the
integrator, the empirical margin and the SD snapshot travel in the checkpoint's ``task_state``.
"""
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils.model import unwrap_model

from .criterion import TfFDLoss
from .features import FeatureTaps, resolve_stages
from .integrators import INTEGRATORS, create_integrator
from .losses.margin import MarginL2Loss
from .self_distill import SelfDistill
from .teacher import SFDTeacher, create_teacher
from .wrap import get_tffd_state, is_wrapped

__all__ = ['SFDTask', 'SFDTrainableModule', 'MAX_UPSAMPLE']

_logger = logging.getLogger(__name__)

# The largest upsampling an integrator may apply to its finest student input. 4x is the paper's own largest rescale
# (RI upsamples its h/4 branch to h); beyond it the integrated map would be mostly interpolation.
MAX_UPSAMPLE = 4


class SFDTrainableModule(FeatureDistillationTrainableModule):
    """Student + integrator: everything SFD optimizes. DDP wraps this module; the exported model is ``student``.

    Reuses timm's ``FeatureDistillationTrainableModule`` for the optimizer hooks (``no_weight_decay``,
    ``group_matcher``); its ``projection`` stays ``None``.

    Args:
        student: The timm student, optionally Tf-FD wrapped (then the stage features are read from the Tf-FD taps of
            the same forward pass).
        integrator: An SFD integrator, or ``None`` (no teacher: ``forward`` returns ``(logits, None)``).
        stages: ``feature_info`` indices the integrator reads, shallow to deep.
    """

    def __init__(self, student: nn.Module, integrator: Optional[nn.Module] = None, stages: Sequence[int] = ()):
        super().__init__(student, projection=None)
        self.integrator = integrator
        self.stages = list(stages)
        self._taps = FeatureTaps(student, self.stages) if integrator is not None else None
        self._tffd_positions = None
        if integrator is not None and is_wrapped(student):
            tapped = get_tffd_state(student).taps.indices
            missing = [s for s in self.stages if s not in tapped]
            if missing:
                raise ValueError(
                    f'SFD reads student stages {self.stages} from the Tf-FD taps of the same forward pass, but Tf-FD '
                    f'taps {tapped}; wrap the student with stages that include {missing}')
            self._tffd_positions = [tapped.index(s) for s in self.stages]

    def forward(
            self,
            input: torch.Tensor,
            size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(logits, integrated feature or None)``; ``size`` is the teacher map's ``(h, w)``."""
        if self.integrator is None:
            return self.student(input), None
        if self.training and self._tffd_positions is not None:
            logits = self.student(input)  # the Tf-FD forward leaves its stage features in the stash
            feats = get_tffd_state(self.student).stash.features
            feats = [feats[p] for p in self._tffd_positions]
        else:
            logits, feats = self._taps.forward(self.student, input)
        return logits, self.integrator(feats, size)


def _student_norm(student: nn.Module, key: str, value: Optional[Sequence[float]]) -> torch.Tensor:
    value = value if value is not None else unwrap_model(student).pretrained_cfg[key]
    return torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1)


class SFDTask(TrainingTask):
    """SFD feature distillation and / or SD / RSD self-distillation, optionally on a Tf-FD wrapped student.

    Args:
        student_model: The timm student (optionally wrapped with ``timm_tffd.wrap``: its Tf-FD terms add in).
        teacher: ``None`` (no SFD loss), a timm / ``hf-hub:`` model name, an ``nn.Module`` or a
            ``DistillationTeacher``. Any architecture with ``feature_info`` (heterogeneous pairs work).
        teacher_checkpoint: Weights for a teacher given by name (file or ``hf-hub:``), checked by
            ``load_teacher_checkpoint``.
        integrator: ``'ri'`` (seed 004's default), ``'li'`` or ``'ai'``.
        sfd_weight: Weight of the distillation loss; 3 in seed 004.
        normalizer: Divisor of the batch-mean eq. 10 sum (see ``margin_l2_loss``).
        teacher_stage: ``feature_info`` index of the distilled teacher stage (the last one in seed 004).
        self_distill: ``None``, ``'sd'`` or ``'rsd'`` (see ``SelfDistill``).
        sd_tau: tau range of SD / RSD (``'START,END'`` or a pair); 0.995 -> 0.999 in seed 004.
        num_epochs: Training length, for the tau ramp.
        sd_seed: Seed of the RSD flip draws (under DDP, rank 0's draw is used on every rank).
        criterion: Base classification loss; ``None`` creates one from ``criterion_kwargs`` like timm's tasks.
        criterion_kwargs: Arguments for ``timm.loss.create_classification_loss``.
        tffd_kwargs: ``TfFDLoss`` options (``weights``, ``warmup_epochs``, ``decay``, ``check_finite``) for a wrapped
            student.
        student_mean: Normalization mean of the student's input pipeline; default the student's ``pretrained_cfg``.
        student_std: Normalization std of the student's input pipeline.
        teacher_mean: Normalization mean the teacher was trained with; default its ``pretrained_cfg``.
        teacher_std: Normalization std the teacher was trained with.
        device: Device for task tensors and new modules.
        dtype: Dtype for task tensors and new modules.
        verbose: Log the configuration.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher: Optional[Union[str, nn.Module, DistillationTeacher]] = None,
            teacher_checkpoint: Optional[str] = None,
            integrator: str = 'ri',
            sfd_weight: float = 3.,
            normalizer: float = 1000.,
            teacher_stage: int = -1,
            self_distill: Optional[str] = None,
            sd_tau: Union[str, Sequence[float]] = (0.995, 0.999),
            num_epochs: Optional[int] = None,
            sd_seed: int = 0,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            tffd_kwargs: Optional[Dict[str, Any]] = None,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            teacher_mean: Optional[Sequence[float]] = None,
            teacher_std: Optional[Sequence[float]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if isinstance(student_model, nn.parallel.DistributedDataParallel):
            raise ValueError('pass the plain student; SFDTask.prepare_distributed() wraps it in DDP')
        if not sfd_weight >= 0:
            raise ValueError(f'sfd_weight must be >= 0, got {sfd_weight}')
        student = student_model

        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        if is_wrapped(student):
            self.tffd = TfFDLoss(self.criterion, student, **(tffd_kwargs or {}))
        elif tffd_kwargs:
            raise ValueError('tffd_kwargs given, but the student is not wrapped with timm_tffd.wrap()')
        else:
            self.tffd = None

        self.integrator_name = None
        integrator_module, stages = None, []
        if teacher is None:
            if teacher_checkpoint is not None:
                raise ValueError('teacher_checkpoint given without a teacher')
            self.teacher = None
        else:
            if not isinstance(teacher, DistillationTeacher):
                plain = unwrap_model(student)
                teacher = create_teacher(
                    teacher, teacher_checkpoint, num_classes=getattr(plain, 'num_classes', None),
                    in_chans=getattr(plain, 'in_chans', 3), mean=teacher_mean, std=teacher_std,
                    device=self.device, dtype=self.dtype)
            elif teacher_checkpoint is not None or teacher_mean is not None or teacher_std is not None:
                raise ValueError('teacher_checkpoint / teacher_mean / teacher_std apply to a teacher created here, '
                                 'not to a DistillationTeacher')
            self.teacher = SFDTeacher(teacher, stage=teacher_stage)
            self.integrator_name = str(integrator).lower()
            if self.integrator_name not in INTEGRATORS:
                raise ValueError(f'unknown SFD integrator {integrator!r}; valid: {", ".join(INTEGRATORS)}')
            stages = self._student_stages(student, INTEGRATORS[self.integrator_name].num_stages)
            self._check_reach(student, stages)
            info = student.feature_info
            input_size = unwrap_model(student).pretrained_cfg.get('input_size', (3, 224, 224))
            nominal = [max(math.ceil(s / self.teacher.reduction), 1) for s in input_size[-2:]]
            integrator_module = create_integrator(
                self.integrator_name, [info[i]['num_chs'] for i in stages], (self.teacher.channels, *nominal))
            integrator_module.to(device=self.device, dtype=self.dtype)
            self.register_buffer('student_mean', _student_norm(student, 'mean', student_mean).to(self.device),
                                 persistent=False)
            self.register_buffer('student_std', _student_norm(student, 'std', student_std).to(self.device),
                                 persistent=False)
        self.sfd_weight = sfd_weight
        self.sfd_loss = MarginL2Loss(normalizer)
        self.trainable_module = SFDTrainableModule(student, integrator_module, stages)
        self.self_distill = None
        if self_distill is not None:
            self.self_distill = SelfDistill(self.trainable_module, self_distill, sd_tau, num_epochs, seed=sd_seed)

        if self.verbose:
            parts = []
            if self.teacher is not None:
                t = self.teacher
                parts.append(f'SFD integrator={self.integrator_name} on student stages {stages}, teacher stage '
                             f'{t.module_name} ({t.channels} ch, margin={t.margin_kind}), weight={sfd_weight}')
            if self.self_distill is not None:
                parts.append(f'{self_distill.upper()} tau={self.self_distill.tau}')
            if self.tffd is not None:
                parts.append(f'Tf-FD {self.tffd.weights}')
            _logger.info(f'SFDTask: {"; ".join(parts) or "plain classification"}')

    @staticmethod
    def _student_stages(student: nn.Module, num_stages: int) -> List[int]:
        stages = resolve_stages(student)
        if len(stages) < num_stages:
            raise ValueError(
                f'the SFD integrator reads the last {num_stages} student stages, but {type(student).__name__} has '
                f'{len(stages)} ({[student.feature_info[i]["module"] for i in stages]}); use RI, which reads one')
        return stages[-num_stages:]

    def _check_reach(self, student: nn.Module, stages: Sequence[int]):
        finest = min(student.feature_info[i]['reduction'] for i in stages)
        if finest > MAX_UPSAMPLE * self.teacher.reduction:
            raise ValueError(
                f'the teacher map {self.teacher.module_name} (stride {self.teacher.reduction}) cannot be reached from '
                f'the student stages the integrator reads (finest stride {finest}): they would be upsampled '
                f'{finest // self.teacher.reduction}x, more than {MAX_UPSAMPLE}x, so the integrated map would be '
                f'mostly interpolation. Distill a coarser teacher stage (teacher_stage) or use LI/AI, which read '
                f'finer student stages.')

    def train(self, mode: bool = True) -> 'SFDTask':
        """Set the training mode; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_epoch(self, epoch: float):
        """Set the epoch for the Tf-FD weight schedule or an epoch-aware base loss (call at every epoch start)."""
        if self.tffd is not None:
            self.tffd.set_epoch(epoch)
        elif hasattr(self.criterion, 'set_epoch'):
            self.criterion.set_epoch(epoch)

    def on_train_epoch_end(self, epoch: int) -> Optional[Dict[str, object]]:
        """Apply SD / RSD after (0-based) ``epoch``: call after training, before validation and checkpointing.
        Returns the update's ``tau`` / ``flipped`` / ``updated`` (``None`` without self-distillation)."""
        if self.self_distill is None:
            return None
        return self.self_distill.step(epoch)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'SFDTask':
        """Wrap student + integrator in DDP; the teacher stays unwrapped and frozen."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student (eval), student + integrator (train) and the teacher's feature path."""
        self.eval_model = torch.compile(self.trainable_module.student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        if self.teacher is not None:
            self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain student (through DDP / EMA wrappers): what is validated and exported."""
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None:
            if isinstance(current, SFDTrainableModule):
                return current.student
            current = getattr(current, 'module', None)
        return resolved

    def get_clip_parameters(self, exclude_head: bool = False):
        trainable = unwrap_model(self.trainable_module)
        parameters = list(trainable.student.parameters())
        if exclude_head:
            parameters = parameters[:-2]
        if trainable.integrator is not None:
            parameters.extend(trainable.integrator.parameters())
        return parameters

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """``sfd``: integrator weights (and the empirical margin), ``self_distill``: the SD / RSD state, ``tffd``:
        the Tf-FD epoch. The EMA task state holds only the EMA integrator."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return {}
        trainable = unwrap_model(module)
        state, sfd = {}, {}
        if trainable.integrator is not None:
            sfd.update(integrator=self.integrator_name, integrator_state=trainable.integrator.state_dict())
        if not ema:
            if self.teacher is not None and self.teacher.empirical is not None:
                sfd['empirical_margin'] = self.teacher.empirical.state_dict()
            if self.self_distill is not None:
                state['self_distill'] = self.self_distill.state_dict()
            if self.tffd is not None:
                state['tffd'] = {'epoch': self.tffd.epoch}
        if sfd:
            state['sfd'] = sfd
        return state

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        if not state:
            return
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            raise RuntimeError('Cannot load EMA task state before setup_ema().' if ema else
                               'Cannot load task state without a trainable module.')
        trainable = unwrap_model(module)
        sfd = state.get('sfd', {})
        if 'integrator_state' in sfd:
            if trainable.integrator is None:
                if strict:
                    raise RuntimeError(f'the checkpoint has an SFD integrator ({sfd.get("integrator")}), but this '
                                       f'task has no teacher')
            elif sfd.get('integrator') != self.integrator_name:
                raise ValueError(f'the checkpoint was trained with the {sfd.get("integrator")!r} integrator, this '
                                 f'task uses {self.integrator_name!r}')
            else:
                trainable.integrator.load_state_dict(sfd['integrator_state'], strict=strict)
        elif trainable.integrator is not None:
            _logger.warning('the checkpoint has no SFD integrator state: the integrator starts from scratch')
        if ema:
            return
        if 'empirical_margin' in sfd and self.teacher is not None and self.teacher.empirical is not None:
            self.teacher.empirical.load_state_dict(sfd['empirical_margin'])
        if self.self_distill is not None and 'self_distill' in state:
            self.self_distill.load_state_dict(state['self_distill'])
        if self.tffd is not None and 'tffd' in state:
            self.tffd.set_epoch(state['tffd']['epoch'])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return ``loss``, ``output``, ``base_loss``, ``sfd`` (with a teacher) and the ``tffd_*`` terms (wrapped
        student, training mode)."""
        size = teacher_feature = margin = None
        if self.teacher is not None:
            teacher_feature, margin = self.teacher(
                input, self.student_mean, self.student_std, update_margin=self.training)
            size = tuple(teacher_feature.shape[-2:])
        output, integrated = self.trainable_module(input, size)
        if self.tffd is not None and self.training:
            result = self.tffd.compute(output, target)
        else:
            base = self.criterion(output, target)
            result = {'loss': base, 'base_loss': base}
        if integrated is not None:
            sfd = self.sfd_loss(integrated, teacher_feature, margin)
            result['loss'] = result['loss'] + self.sfd_weight * sfd
            result['sfd'] = sfd
        result['output'] = output
        return result

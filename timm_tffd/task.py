"""timm ``TrainingTask`` that trains a classifier with Tf-FD.

It plugs into timm's task machinery unchanged: ``prepare_distributed`` (DDP), ``compile``, ``setup_ema`` /
``update_ema``, and ``get_checkpoint_state`` (the saved ``state_dict`` is the plain timm model; ``task_state`` holds the
Tf-FD configuration and epoch).
"""
import logging
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from .criterion import TfFDLoss
from .wrap import is_wrapped, wrap

__all__ = ['TfFDTask']

_logger = logging.getLogger(__name__)


class TfFDTask(ClassificationTask):
    """Classification with Teacher-free Feature Distillation.

    Args:
        model: A timm model; wrapped here unless already wrapped.
        criterion: The base classification loss; ``None`` creates one from ``criterion_kwargs`` like
            ``ClassificationTask``.
        tffd: Method names, e.g. ``'inter,intra'``.
        weights: ``{method: lambda}``.
        warmup_epochs: Linear warm-up of the Tf-FD weight (epochs).
        decay: ``(start, end)`` early-decay epochs or ``None``.
        stages: ``feature_info`` indices to tap.
        preact: Tap pre-activation stage outputs.
        method_options: Options routed to the methods (``pairs``, ``saliency``, ...).
        check_finite: See ``TfFDLoss``.
        criterion_kwargs, device, dtype, verbose: As in ``ClassificationTask``.
    """

    def __init__(
            self,
            model: nn.Module,
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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if not is_wrapped(model):
            model = wrap(model, tffd, stages=stages, preact=preact, **(method_options or {}))
        super().__init__(model, criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype,
                         verbose=False)
        self.criterion = TfFDLoss(self.criterion, model, weights, warmup_epochs, decay, check_finite)
        if verbose:
            _logger.info(f'TfFDTask: methods={self.criterion.weights}, warmup_epochs={warmup_epochs}, '
                         f'decay={decay}, stages={self.criterion._state.taps.modules}, preact={preact}')

    def set_epoch(self, epoch: float):
        """Set the epoch read by the Tf-FD weight schedule (call at the start of every epoch)."""
        self.criterion.set_epoch(epoch)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        result = self.criterion.compute(output, target)
        result['output'] = output
        return result

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        if ema:
            return {}
        return {'tffd': {'epoch': self.criterion.epoch, 'weights': dict(self.criterion.weights),
                         'config': dict(self.criterion._state.config)}}

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        if ema or not state or 'tffd' not in state:
            return
        saved = state['tffd']
        self.criterion.set_epoch(saved['epoch'])
        if saved.get('config') != self.criterion._state.config or saved.get('weights') != self.criterion.weights:
            _logger.warning(f'Tf-FD settings differ from the checkpoint: checkpoint {saved.get("weights")} '
                            f'{saved.get("config")}, now {self.criterion.weights} {self.criterion._state.config}')

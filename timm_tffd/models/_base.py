"""Shared timm interface of the CIFAR model zoo: default cfg, builder and a ``stem -> stages -> head`` base class.

Every network in the zoo is a stem at full resolution, stages named ``layer1 ... layerN``, an optional final norm
(the pre-activation WRN's closing BN-ReLU) and timm's global pool + ``fc`` classifier. ``feature_info`` holds the stem
(index 0) and one entry per stage, and ``forward_intermediates`` / ``prune_intermediate_layers`` follow timm's
contract, so ``final, feats = m.forward_intermediates(x); m.forward_head(final)`` equals ``m(x)`` in eval mode.
"""
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices  # timm's own models import it from here; not re-exported

__all__ = ['CIFAR100_MEAN', 'CIFAR100_STD', 'CifarNet', 'cifar_cfg', 'build_cifar_model', 'rename_keys']

# CIFAR-100 training-set statistics, as normalized by the CRD repository (dataset/cifar100.py).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def rename_keys(
        state_dict: Dict[str, torch.Tensor],
        marker: str,
        renames: Sequence[Tuple[str, Union[str, Callable[[re.Match], str]]]],
) -> Dict[str, torch.Tensor]:
    """Rename the keys of a foreign state dict with ``re.sub`` rules applied in order, when it has the ``marker`` key;
    a state dict without it (already in this model's layout) passes through unchanged."""
    if marker not in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def cifar_cfg(**kwargs) -> Dict[str, Any]:
    """Default (pretrained) cfg of a zoo model: 32x32 CIFAR-100 inputs, no resize or crop at test time."""
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc', **kwargs,
    }


def build_cifar_model(
        model_cls: Type['CifarNet'],
        variant: str,
        pretrained: bool = False,
        num_feature_maps: int = 4,
        pretrained_filter_fn: Optional[Callable] = None,
        **kwargs,
) -> 'CifarNet':
    """``build_model_with_cfg`` for the zoo; ``features_only=True`` uses ``forward_intermediates`` (timm's getter).

    Args:
        model_cls: The model class.
        variant: The registered name.
        pretrained: Load the weights named by the (overlaid) pretrained cfg, e.g. ``file=...``.
        num_feature_maps: Length of the model's ``feature_info``; ``features_only=True`` returns all of them unless
            ``out_indices`` is given.
        pretrained_filter_fn: Maps foreign checkpoints (the CRD repository's) to the model's keys.
        **kwargs: Model arguments.
    """
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=pretrained_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=tuple(range(num_feature_maps))),
        **kwargs,
    )


class CifarNet(nn.Module):
    """Base class: a stem at full resolution, stages ``layer1 ... layerN``, a final norm and timm's classifier head.

    Subclasses build the stem (``forward_stem``), the stages, ``feature_info`` (stem first) and the final ``norm``
    (``nn.Identity`` where there is none), then call ``_init_head``.
    """

    def __init__(self, num_classes: int, in_chans: int, drop_rate: float):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.feature_info: List[Dict[str, Any]] = []

    def _init_head(self, num_features: int, global_pool: str):
        self.num_features = num_features
        self.global_pool, self.fc = create_classifier(num_features, self.num_classes, pool_type=global_pool)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    def _init_convs(self):
        """He-normal (fan-out) convolutions with zero bias, as in every CRD model."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_stages(self) -> int:
        return len(self.feature_info) - 1

    def stage_modules(self) -> List[nn.Module]:
        """The stage modules ``layer1 ... layerN``, shallow to deep."""
        return [getattr(self, f'layer{i}') for i in range(1, self.num_stages + 1)]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|^bn1|^stem',
            blocks=[(r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the classifier (``num_classes=0``: none); ``global_pool=None`` keeps the current pooling."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        training = self.training
        self._init_head(self.num_features, global_pool)
        self.global_pool.train(training)
        self.fc.train(training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward pass that also returns the ``feature_info`` maps (stem = index 0).

        Args:
            x: Input images.
            indices: Take the last n features if int, all if None, the given indices if a sequence.
            norm: Apply the final norm to the last stage's map (WRN; a no-op elsewhere).
            stop_early: Stop after the last requested feature (the returned final map is then not the model's).
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return the list of features only.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'{type(self).__name__} only returns NCHW features, got output_fmt={output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stage_modules()[:max_index] if stop_early else self.stage_modules()
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = self._run_stage(stage, x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == self.num_stages else x)
        if intermediates_only:
            return intermediates
        if feat_idx == self.num_stages:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last kept feature (and the head); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, self.num_stages + 1):
            setattr(self, f'layer{i}', nn.Sequential())  # empty, so forward passes the map through
        prune_end = max_index < self.num_stages
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            # the head is sized for the last stage, so it goes with it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage in self.stage_modules():
            x = self._run_stage(stage, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

#!/usr/bin/env python3
"""Train a timm classifier with Teacher-free Feature Distillation (Tf-FD), argument-compatible with timm's train.py.

    python train_timm_tffd.py /data/imagenet --model resnet50 --tffd inter,intra
    torchrun --nproc_per_node 8 train_timm_tffd.py /data/imagenet --model resnet50 --tffd inter,intra --amp
    python train_timm_tffd.py --model resnet18 --tffd inter,intra    # no data dir: the embedded Fashion-MNIST subset

Without ``--tffd`` it is plain timm training (``timm.task.ClassificationTask``). It takes every argument of timm's
train.py, with train.py's names and defaults (``timm_tffd.train_compat.TIMM_TRAIN_ARGS``; the few that behave
differently are listed in docs/training.md); a ``-c`` YAML config goes through the same checks as the command line.
The output folder has train.py's layout: ``args.yaml``, ``summary.csv`` (plus one ``train_<name>`` column per loss term
the task reports), ``last.pth.tar``, ``checkpoint-<epoch>.pth.tar`` and ``model_best.pth.tar``, all written
atomically.
"""
import argparse
import importlib
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torchvision.utils
import yaml
from torchvision import transforms
from timm import utils
from timm.data import (
    AugMixDataset, FastCollateMixup, Mixup, NaFlexMixup, create_dataset, create_loader, create_naflex_loader,
    resolve_data_config)
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import JsdCrossEntropy, create_classification_loss
from timm.models import create_model, is_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationTask, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask, TrainingTask,
    evaluation_sample_limit, load_task_ema_checkpoint, resume_task_checkpoint)
from timm.utils import NativeScaler

from timm_tffd import SFDTask, TfFDConfig, TfFDTask, diagnose_nonfinite, is_wrapped
from timm_tffd.kd import TfFDFeatureDistillationTask, TfFDLogitDistillationTask, TfFDTokenDistillationTask
from timm_tffd.losses.smoothing import SCHEDULES, DynamicLabelSmoothingCrossEntropy
from timm_tffd.self_distill import SELF_DISTILL_MODES, SelfDistill, parse_tau
from timm_tffd.teacher import create_teacher
from timm_tffd.checkpoint import AtomicCheckpointSaver, append_summary, atomic_write_text, trim_summary_atomic
from timm_tffd.data.embedded import EMBEDDED_DATA_CONFIG, EmbeddedFashionMNIST, uses_embedded_data
from timm_tffd.data.subset import SampledSubset
from timm_tffd.loss_meter import LossMeter
from timm_tffd.losses.inter import DIRECTIONS, PAIRS
from timm_tffd.losses.saliency import MODEL_SALIENCY, SALIENCY
from timm_tffd.methods import get_method, list_methods
from timm_tffd.train_compat import ArgumentTable, config_argv, load_config

_logger = logging.getLogger('train')

_DATASET_TYPES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')  # the <type>/ prefixes timm's create_dataset knows
_FOLDER_DATASETS = ('', 'folder', 'imagefolder', 'image_folder', 'tar')  # a folder or .tar at the data dir
_ROOTLESS_TYPES = ('hfds', 'hfids', 'tfds', 'wds')  # their data dir is a cache or may be created on first use
_BAR_REFRESH = 10  # steps between progress-bar refreshes (each reads the running means from the device)


# ------------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------------

# Command-line form of every method option (``wrap()`` keyword -> flag type, choices and help). The flags are
# ``--tffd-<option>``; each method also gets ``--tffd-<method>-weight``. Defaults come from the method registry.
_TFFD_OPTION_FLAGS = {
    'pairs': dict(type=str, choices=PAIRS, help='inter-layer stage pairs: all (reference code, CIFAR) or adjacent '
                                                '(ImageNet, Tf-FD supplementary)'),
    'direction': dict(type=str, choices=DIRECTIONS, help='inter-layer direction (TFD ablation, Li et al., IJCNN 2022)'),
    'saliency': dict(type=str, choices=list(SALIENCY) + list(MODEL_SALIENCY),
                     help='intra-layer channel saliency (norm: the reference code)'),
    'detach_salient': dict(action='store_true', help='intra-layer: no gradient into the salient half'),
    'emd_grid': dict(type=int, metavar='G', help='EMD: pool both maps to a GxG grid of local positions (default: '
                                                 'all positions)'),
    'emd_pairs': dict(type=str, choices=PAIRS, help='EMD stage pairs'),
    'emd_eps': dict(type=float, metavar='EPS', help='EMD: entropic regularization, relative to the mean cost'),
    'emd_iters': dict(type=int, metavar='N', help='EMD: Sinkhorn iterations'),
    'm2o_pairs': dict(type=str, choices=PAIRS, help='many-to-one stage pairs'),
    'm2o_remainder': dict(type=str, choices=('spread', 'drop'),
                          help='many-to-one: deep channels left over when C_deep %% C_shallow != 0'),
}


def _add_tffd_arguments(parser: argparse.ArgumentParser, table: ArgumentTable):
    own = table.own
    group = parser.add_argument_group('Teacher-free Feature Distillation (not timm arguments)')
    own(group, '--tffd', type=str, default=None, metavar='METHODS',
        help=f'comma-separated Tf-FD methods, e.g. inter,intra (known: {", ".join(list_methods())}); none: plain '
             f'timm training')
    for m in list_methods():
        method = get_method(m)
        own(group, f'--tffd-{m}-weight', type=float, default=method.default_weight, metavar='W',
            help=f'{m} loss weight: {method.description} (default: %(default)s)')
    defaults = TfFDConfig.flag_defaults()
    own(group, '--tffd-warmup-epochs', type=float, default=defaults['tffd_warmup_epochs'], metavar='N',
        help='linear warm-up of the Tf-FD weights over N epochs, 0 for none (default: 20, the reference code)')
    own(group, '--tffd-early-decay', type=float, nargs=2, default=None, metavar=('START', 'END'),
        help='early decay: the Tf-FD weights fall linearly to 0 between these epochs (default: none)')
    own(group, '--tffd-stages', type=int, nargs='+', default=None, metavar='I',
        help='feature_info indices of the tapped stages (default: all but the stem)')
    own(group, '--tffd-preact', action='store_true',
        help='tap stage outputs before their closing ReLU (ResNet-style stages)')
    for option, spec in _TFFD_OPTION_FLAGS.items():
        spec = dict(spec)
        if spec.get('action') != 'store_true' and 'default:' not in spec['help']:
            spec['help'] += ' (default: %(default)s)'
        own(group, f'--tffd-{option.replace("_", "-")}', default=defaults[f'tffd_{option}'], **spec)


def _add_teacher_arguments(parser: argparse.ArgumentParser, table: ArgumentTable):
    add, own = table.timm, table.own
    group = parser.add_argument_group('Distillation from a teacher: timm\'s logit / feature / token KD, and SFD')
    add(group, 'kd_model_name', '--teacher', type=str, metavar='NAME',
        help='teacher model: a timm name (with --teacher-checkpoint, or timm\'s pretrained weights), hf-hub:org/name '
             'or local-dir:PATH. Alone: logit KD; with --sfd: SFD')
    own(group, '--teacher-checkpoint', type=str, default=None, metavar='PATH',
        help='teacher weights: a .safetensors file, a training checkpoint (read with weights_only=True) or '
             'hf-hub:org/name (not a timm argument)')
    own(group, '--teacher-mean', type=float, nargs='+', default=None, metavar='MEAN',
        help='normalization mean the teacher was trained with (default: the student\'s for a --teacher-checkpoint, '
             'else the teacher\'s pretrained cfg; not a timm argument)')
    own(group, '--teacher-std', type=float, nargs='+', default=None, metavar='STD',
        help='normalization std the teacher was trained with (default: as --teacher-mean; not a timm argument)')
    add(group, 'kd_distill_type', type=str, choices=('logit', 'feature', 'token'),
        help='timm\'s distillation type: logit, feature (projected pooled features) or token (distillation-token '
             'models) (default: logit)')
    add(group, 'kd_loss_type', type=str, choices=('kl',), help='logit distillation loss (default: kl)')
    add(group, 'distill_loss_weight', type=float, help='weight of the distillation term (see timm\'s distillation '
                                                       'tasks)')
    add(group, 'task_loss_weight', type=float, help='weight of the classification term (see timm\'s distillation '
                                                    'tasks)')
    add(group, 'kd_temperature', type=float, help='softmax temperature of logit and soft token KD (default: 4)')
    add(group, 'kd_student_feature_dim', type=int, metavar='N',
        help='feature KD: student feature width (default: the model\'s)')
    add(group, 'kd_teacher_feature_dim', type=int, metavar='N',
        help='feature KD: teacher feature width (default: the model\'s)')
    add(group, 'kd_token_distill_type', type=str, choices=('soft', 'hard'),
        help='token KD: soft (KL with temperature) or hard (CE on the teacher\'s argmax) (default: soft)')
    own(group, '--sfd', type=str, nargs='?', const='ri', default=None, choices=('li', 'ai', 'ri'),
        help='SFD feature distillation from the teacher with this integrator (default when given without value: ri, '
             'the paper\'s default; not a timm argument)')
    own(group, '--sfd-weight', type=float, default=3.0, metavar='W',
        help='SFD loss weight (default: 3, as in SFD)')

    group = parser.add_argument_group(
        'Self-distillation SD / RSD (SFD, Pei et al., IJCAI 2021, eqs. 8-9; not timm arguments)')
    own(group, '--self-distill', type=str, default=None, choices=SELF_DISTILL_MODES,
        help='after each epoch, theta <- tau theta + (1 - tau) theta_prev: "sd", or "rsd" (previous conv kernels '
             'flipped horizontally with p = 0.5)')
    own(group, '--sd-tau', type=str, default='0.995,0.999', metavar='START,END',
        help='tau, ramped linearly over the epochs (default: %(default)s, SFD Table 2)')

    group = parser.add_argument_group('Dynamic label smoothing (not timm arguments)')
    own(group, '--smoothing-schedule', type=str, default='constant', choices=SCHEDULES,
        help='how --smoothing changes over the epochs: constant (timm), linear or cosine to --smoothing-end, or '
             'adaptive (per sample, smoothing * p(target)) (default: constant)')
    own(group, '--smoothing-end', type=float, default=None, metavar='S',
        help='smoothing at the last epoch for linear / cosine (default: 0)')


def _default_workers() -> int:
    """timm's default of 4 data-loading processes, capped at the CPUs this process may use (torch warns above)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _build_parsers():
    """The ``-c`` parser, the full parser (every argument of timm's train.py, then this script's own), and the
    ``ArgumentTable`` that knows each argument's action."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE',
                               help='YAML config (e.g. an args.yaml of timm\'s train.py or of this script); the '
                                    'command line overrides it')
    parser = _Parser(
        description='Train a timm model with Teacher-free Feature Distillation. Takes every argument of timm\'s '
                    'train.py, with its names and defaults, plus the Tf-FD, teacher and self-distillation arguments.',
        parents=[config_parser])
    table = ArgumentTable()
    add, own = table.timm, table.own

    group = parser.add_argument_group('Dataset')
    add(parser, 'data', nargs='?', metavar='DIR',
        help='dataset root (as timm, same as --data-dir); none: the embedded Fashion-MNIST subset')
    add(group, 'data_dir', metavar='DIR', help='dataset root')
    add(group, 'dataset', metavar='NAME',
        help='"" (folder or .tar at the data dir) or <type>/<name> with type torch, hfds, hfids, tfds or wds')
    add(group, 'train_split', metavar='NAME', help='training split (default: train)')
    add(group, 'val_split', metavar='NAME', help='validation split, "" for none (default: validation)')
    add(group, 'train_num_samples', type=int, metavar='N', help='samples in the training split (iterable datasets)')
    add(group, 'val_num_samples', type=int, metavar='N', help='samples in the validation split (iterable datasets)')
    add(group, 'dataset_download', action='store_true', help='let torch/ and tfds/ datasets download into the data dir')
    add(group, 'class_map', type=str, metavar='FILENAME', help='class name to index mapping file')
    add(group, 'input_img_mode', type=str, metavar='MODE',
        help='PIL mode the images are converted to (default: RGB for 3 input channels, L for 1)')
    add(group, 'input_key', type=str, help='image field of hfds/ datasets (default: reader default, "image")')
    add(group, 'target_key', type=str, help='label field of hfds/ datasets (default: reader default, "label")')
    add(group, 'dataset_trust_remote_code', action='store_true',
        help='let Hugging Face datasets run code from the dataset\'s repository')
    own(group, '--max-train-samples', type=int, default=None, metavar='N',
        help='train on a fixed random subset of N training samples (seeded by --seed, the same on every rank): for '
             'smoke tests and quick runs (not a timm argument)')
    own(group, '--max-val-samples', type=int, default=None, metavar='N',
        help='validate on a fixed random subset of N samples (not a timm argument)')

    group = parser.add_argument_group('Model')
    add(group, 'model', type=str, metavar='MODEL', help='timm model name (default: resnet50)')
    add(group, 'pretrained', action='store_true', help='start from the model\'s pretrained weights')
    add(group, 'pretrained_path', type=str, metavar='PATH',
        help='load this file as the pretrained weights, with timm\'s adaptation of the classifier and input channels')
    add(group, 'initial_checkpoint', type=str, metavar='PATH', help='load these weights after creating the model')
    add(group, 'resume', type=str, metavar='PATH',
        help='resume model, optimizer, scheduler, EMA, epoch and Tf-FD state from a checkpoint')
    add(group, 'no_resume_opt', action='store_true', help='with --resume: do not restore the optimizer and loss scaler')
    add(group, 'num_classes', type=int, metavar='N', help='number of classes (default: model default)')
    add(group, 'gp', type=str, metavar='POOL', help='global pool type, e.g. avg, max, avgmax (default: model default)')
    add(group, 'img_size', type=int, metavar='N', help='image size (default: model default)')
    add(group, 'in_chans', type=int, metavar='N', help='input channels (default: 3)')
    add(group, 'input_size', type=int, nargs=3, metavar='N', help='input size C H W, e.g. 3 224 224 (default: model '
                                                                  'default)')
    add(group, 'crop_pct', type=float, metavar='PCT', help='validation center-crop fraction (default: model default)')
    add(group, 'mean', type=float, nargs='+', metavar='MEAN', help='normalization mean (default: model default)')
    add(group, 'std', type=float, nargs='+', metavar='STD', help='normalization std (default: model default)')
    add(group, 'interpolation', type=str, metavar='NAME', help='resize interpolation (default: model default)')
    add(group, 'batch_size', type=int, metavar='N', help='batch size per process (default: 128)')
    add(group, 'validation_batch_size', type=int, metavar='N', help='validation batch size (default: --batch-size)')
    add(group, 'channels_last', action='store_true', help='channels_last memory layout')
    add(group, 'fuser', type=str, choices=('', 'te', 'old', 'nvfuser'), help='TorchScript fuser (default: torch\'s)')
    add(group, 'grad_accum_steps', type=int, metavar='N',
        help='accumulate gradients over N batches per optimizer step (default: 1)')
    add(group, 'grad_checkpointing', action='store_true', help='gradient checkpointing through the model\'s blocks')
    add(group, 'fast_norm', action='store_true', help='timm\'s experimental fast normalization layers')
    add(group, 'model_kwargs', nargs='*', action=_ParseKwargs, metavar='KEY=VALUE',
        help='extra model constructor arguments, e.g. img_size=32 for a ViT on the embedded data')
    add(group, 'head_init_scale', type=float, metavar='S', help='multiply the initial classifier weights by S')
    add(group, 'head_init_bias', type=float, metavar='B', help='initialize the classifier bias to B')
    add(group, 'torchcompile_mode', type=str, metavar='MODE', help='torch.compile mode (default: torch\'s)')
    scripting = group.add_mutually_exclusive_group()
    add(scripting, 'torchscript', action='store_true', help='torch.jit.script the model (not with --tffd)')
    add(scripting, 'torchcompile', nargs='?', type=str, const='inductor', metavar='BACKEND',
        help='torch.compile the task with this backend (default when given without value: inductor)')

    group = parser.add_argument_group('Device and precision')
    add(group, 'device', type=str, default=None,
        help='device (default: cuda when available, else cpu; timm\'s train.py defaults to cuda)')
    add(group, 'amp', action='store_true', help='mixed precision (autocast; bfloat16 on CPU)')
    add(group, 'amp_dtype', type=str, choices=('float16', 'bfloat16'),
        help='autocast dtype on CUDA (default: float16, with loss scaling)')
    add(group, 'model_dtype', type=str, choices=('float32', 'float16', 'bfloat16'),
        help='train the model in this dtype instead of float32 (not with --amp)')
    add(group, 'no_ddp_bb', action='store_true', help='DDP: do not broadcast buffers')
    add(group, 'synchronize_step', action='store_true', help='synchronize the device after each optimizer step')
    add(group, 'local_rank', type=int, help='set by legacy launchers; the rank is read from the environment')
    add(group, 'device_modules', type=str, nargs='+', metavar='MODULE',
        help='Python modules to import for a device backend')

    group = parser.add_argument_group('Optimizer')
    add(group, 'opt', type=str, metavar='OPTIMIZER', help='timm optimizer name (default: sgd)')
    add(group, 'opt_eps', type=float, metavar='EPSILON', help='optimizer epsilon (default: optimizer default)')
    add(group, 'opt_betas', type=float, nargs='+', metavar='BETA', help='optimizer betas (default: optimizer default)')
    add(group, 'momentum', type=float, metavar='M', help='optimizer momentum (default: 0.9)')
    add(group, 'weight_decay', type=float, help='weight decay (default: 2e-5)')
    add(group, 'clip_grad', type=float, metavar='NORM', help='clip the gradients at this value (default: no clipping)')
    add(group, 'clip_mode', type=str, choices=('norm', 'value', 'agc'),
        help='gradient clipping: total norm, each value, or adaptive (agc; the classifier is not clipped) '
             '(default: norm)')
    add(group, 'layer_decay', type=float, metavar='RATE', help='layer-wise learning-rate decay (default: none)')
    add(group, 'layer_decay_min_scale', type=float, metavar='S', help='lower bound of the layer-decay scale')
    add(group, 'layer_decay_no_opt_scale', type=float, metavar='S',
        help='freeze the layers whose layer-decay scale falls below S')
    add(group, 'opt_kwargs', nargs='*', action=_ParseKwargs, metavar='KEY=VALUE',
        help='extra optimizer arguments')

    group = parser.add_argument_group('Learning rate schedule')
    add(group, 'sched', type=str, metavar='SCHEDULER', help='timm scheduler name (default: cosine)')
    add(group, 'sched_on_updates', action='store_true', help='step the schedule at every update, not every epoch')
    add(group, 'lr', type=float, metavar='LR', help='learning rate (default: --lr-base scaled by the global batch)')
    add(group, 'lr_base', type=float, metavar='LR', help='lr for a global batch of --lr-base-size (default: 0.1)')
    add(group, 'lr_base_size', type=int, metavar='DIV', help='batch size of --lr-base (default: 256)')
    add(group, 'lr_base_scale', type=str, choices=('', 'linear', 'sqrt'), metavar='SCALE',
        help='"linear" or "sqrt" batch scaling of --lr-base (default: sqrt for ada*/lamb, else linear)')
    add(group, 'lr_noise', type=float, nargs='+', metavar='PCT', help='lr noise on (and off) at these fractions of '
                                                                      'the epochs')
    add(group, 'lr_noise_pct', type=float, metavar='PCT', help='lr noise limit (default: 0.67)')
    add(group, 'lr_noise_std', type=float, metavar='STD', help='lr noise std (default: 1)')
    add(group, 'lr_cycle_mul', type=float, metavar='MULT', help='lr cycle length multiplier (default: 1)')
    add(group, 'lr_cycle_decay', type=float, metavar='MULT', help='lr decay per cycle (default: 0.5)')
    add(group, 'lr_cycle_limit', type=int, metavar='N', help='lr cycles (default: 1)')
    add(group, 'lr_k_decay', type=float, metavar='K', help='k-decay of cosine / poly schedules (default: 1)')
    add(group, 'warmup_lr', type=float, metavar='LR', help='lr at the start of the warmup (default: 1e-5)')
    add(group, 'min_lr', type=float, metavar='LR', help='lower lr bound (default: 0)')
    add(group, 'epochs', type=int, metavar='N', help='epochs to train (default: 300)')
    add(group, 'epoch_repeats', type=float, metavar='N', help='passes over the dataset per epoch (default: 1)')
    add(group, 'start_epoch', type=int, metavar='N', help='first epoch (overrides the one --resume restores)')
    add(group, 'decay_milestones', type=int, nargs='+', metavar='MILESTONES',
        help='epochs of the multistep lr decays (default: 90 180 270)')
    add(group, 'decay_epochs', type=float, metavar='N', help='epochs between step lr decays (default: 90)')
    add(group, 'warmup_epochs', type=int, metavar='N', help='lr warmup epochs (default: 5)')
    add(group, 'warmup_prefix', action='store_true', help='the warmup comes before the schedule, not within it')
    add(group, 'cooldown_epochs', type=int, metavar='N', help='epochs at --min-lr after the schedule (default: 0)')
    add(group, 'patience_epochs', type=int, metavar='N', help='patience of the plateau schedule (default: 10)')
    add(group, 'decay_rate', type=float, metavar='RATE', help='lr decay factor (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization')
    add(group, 'no_aug', action='store_true', help='no training augmentation (resize and center crop only)')
    add(group, 'train_crop_mode', type=str, metavar='MODE', help='training crop mode (default: random resized crop)')
    add(group, 'scale', type=float, nargs='+', metavar='PCT', help='random-resized-crop area range (default: 0.08 1)')
    add(group, 'ratio', type=float, nargs='+', metavar='RATIO',
        help='random-resized-crop aspect range (default: 3/4 4/3)')
    add(group, 'hflip', type=float, help='horizontal flip probability (default: 0.5)')
    add(group, 'vflip', type=float, help='vertical flip probability (default: 0)')
    add(group, 'color_jitter', type=float, metavar='PCT', help='color jitter factor (default: 0.4)')
    add(group, 'color_jitter_prob', type=float, metavar='PCT', help='probability of any color jitter')
    add(group, 'grayscale_prob', type=float, metavar='PCT', help='probability of random grayscale')
    add(group, 'gaussian_blur_prob', type=float, metavar='PCT', help='probability of gaussian blur')
    add(group, 'aa', type=str, metavar='NAME', help='AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5')
    add(group, 'aug_repeats', type=float, metavar='N', help='repeated augmentation: each image N times per epoch '
                                                            '(distributed training)')
    add(group, 'aug_splits', type=int, metavar='N', help='AugMix-style augmentation splits (0, or 2 and more)')
    add(group, 'jsd_loss', action='store_true', help='Jensen-Shannon divergence + CE over the splits (with '
                                                     '--aug-splits)')
    add(group, 'bce_loss', action='store_true', help='binary cross-entropy instead of softmax cross-entropy')
    add(group, 'bce_sum', action='store_true', help='BCE summed over the classes')
    add(group, 'bce_target_thresh', type=float, metavar='T', help='binarize the soft BCE targets at T')
    add(group, 'bce_pos_weight', type=float, metavar='W', help='BCE positive-class weight')
    add(group, 'reprob', type=float, metavar='PCT', help='random erasing probability (default: 0)')
    add(group, 'remode', type=str, choices=('const', 'rand', 'pixel'), help='random erasing fill (default: pixel)')
    add(group, 'recount', type=int, metavar='N', help='random erasing count (default: 1)')
    add(group, 'resplit', action='store_true', help='no random erasing on the first (clean) augmentation split')
    add(group, 'mixup', type=float, help='mixup alpha, on when > 0 (default: 0)')
    add(group, 'cutmix', type=float, help='cutmix alpha, on when > 0 (default: 0)')
    add(group, 'cutmix_minmax', type=float, nargs='+', metavar='RATIO',
        help='cutmix min / max box ratio (turns cutmix on, overrides its alpha)')
    add(group, 'mixup_prob', type=float, help='probability of mixing a batch (default: 1)')
    add(group, 'mixup_switch_prob', type=float, help='probability of cutmix when both are on (default: 0.5)')
    add(group, 'mixup_mode', type=str, choices=('batch', 'pair', 'elem'), help='mixup granularity (default: batch)')
    add(group, 'mixup_off_epoch', type=int, metavar='N', help='no mixup / cutmix from epoch N on (0: never off)')
    add(group, 'smoothing', '--smooth', type=float, help='label smoothing (default: 0.1)')
    add(group, 'train_interpolation', type=str, metavar='NAME',
        help='training resize interpolation (default: random)')
    own(group, '--pad-crop', type=int, default=0, metavar='PIX',
        help='CIFAR-style augmentation: zero-pad by PIX and randomly crop back, before timm\'s train transform; use '
             'with --scale 1 1 --ratio 1 1 --color-jitter 0 for the classic pad-4 crop + flip (not a timm argument)')
    add(group, 'drop', type=float, metavar='PCT', help='dropout rate (default: 0)')
    add(group, 'drop_connect', type=float, metavar='PCT', help='deprecated in timm (use --drop-path); has no effect')
    add(group, 'drop_path', type=float, metavar='PCT', help='drop path rate (default: model default)')
    add(group, 'drop_block', type=float, metavar='PCT', help='drop block rate (resnet / byobnet families)')

    group = parser.add_argument_group('BatchNorm')
    add(group, 'bn_momentum', type=float, metavar='M', help='BatchNorm momentum (default: model default)')
    add(group, 'bn_eps', type=float, metavar='EPS', help='BatchNorm epsilon (default: model default)')
    add(group, 'sync_bn', action='store_true', help='SyncBatchNorm (CUDA only)')
    add(group, 'dist_bn', type=str, choices=('reduce', 'broadcast', ''),
        help='after each epoch, average ("reduce") or copy from rank 0 ("broadcast") the BN statistics '
             '(default: reduce)')
    add(group, 'split_bn', action='store_true', help='separate BatchNorm layers per augmentation split')

    group = parser.add_argument_group('Model EMA')
    add(group, 'model_ema', action='store_true', help='track an exponential moving average of the weights')
    add(group, 'model_ema_force_cpu', action='store_true',
        help='keep the EMA on the CPU (it is then not validated, as in timm)')
    add(group, 'model_ema_decay', type=float, help='EMA decay (default: 0.9998)')
    add(group, 'model_ema_warmup', action='store_true', help='warm up the EMA decay')

    group = parser.add_argument_group('Miscellaneous')
    add(group, 'seed', type=int, metavar='S', help='random seed (default: 42)')
    add(group, 'worker_seeding', type=str, metavar='MODE', help='data-loader worker seeding (default: all)')
    add(group, 'log_interval', type=int, metavar='N', help='optimizer steps between log lines (default: 50)')
    add(group, 'val_interval', type=int, metavar='N',
        help='validate and save a checkpoint every N epochs (and after the last) (default: 1)')
    add(group, 'recovery_interval', type=int, metavar='N',
        help='save a recovery checkpoint every N optimizer steps (default: never)')
    add(group, 'checkpoint_hist', type=int, metavar='N', help='epoch checkpoints to keep (default: 10)')
    add(group, 'workers', type=int, metavar='N', default=_default_workers(),
        help='data loading processes per rank (default: timm\'s 4, at most the CPUs available: %(default)s)')
    add(group, 'save_images', action='store_true', help='save the input batch as an image at each log line')
    add(group, 'pin_mem', action='store_true', help='pin the loaders\' CPU memory')
    add(group, 'no_prefetcher', action='store_true', help='no timm prefetcher: batches are moved and mixed in the loop')
    add(group, 'output', type=str, metavar='PATH', help='output root (default: ./output/train)')
    add(group, 'experiment', type=str, metavar='NAME', help='output sub-folder (default: date-model-size)')
    add(group, 'eval_metric', type=str, choices=('top1', 'top5', 'loss'), metavar='EVAL_METRIC',
        help='validation metric that picks model_best (default: top1)')
    add(group, 'tta', type=int, metavar='N',
        help='validation: average the outputs of N consecutive samples (a loader that repeats each image N times)')
    add(group, 'use_multi_epochs_loader', action='store_true', help='keep the data-loading processes across epochs')
    add(group, 'log_wandb', action='store_true', help='log the summary rows to Weights & Biases')
    add(group, 'wandb_project', type=str, help='wandb project')
    add(group, 'wandb_tags', type=str, nargs='+', help='wandb tags')
    add(group, 'wandb_resume_id', type=str, metavar='ID', help='wandb run id to resume (with --resume)')

    group = parser.add_argument_group('Variable resolution and NaFlex loaders')
    add(group, 'train_img_sizes', type=int, nargs='+', metavar='N', help='per-batch square training image sizes')
    add(group, 'train_batch_sizes', type=int, nargs='+', metavar='N', help='batch size of each --train-img-sizes '
                                                                           'choice (default: --batch-size)')
    add(group, 'train_size_probs', type=float, nargs='+', metavar='P', help='weights of the --train-img-sizes '
                                                                            'choices (default: uniform)')
    add(group, 'train_size_schedule', type=str, choices=('constant', 'progressive'),
        help='resolution choice schedule (default: constant)')
    add(group, 'train_size_schedule_spread', type=float, metavar='S', help='progressive schedule spread (default: '
                                                                           '0.65)')
    add(group, 'train_size_random_mix', type=float, metavar='P',
        help='uniform random choices mixed into a progressive schedule (default: 0.1)')
    add(group, 'train_batches_per_epoch', type=int, metavar='N', help='training batches per epoch (default: '
                                                                      'inferred)')
    add(group, 'variable_batch_loss_scale', type=str, choices=('none', 'sqrt', 'linear'),
        help='scale the loss by the batch size relative to the average scheduled one (default: none)')
    add(group, 'naflex_loader', action='store_true', help='timm\'s NaFlex loader (NaFlex models; not with --tffd)')
    add(group, 'naflex_train_seq_lens', type=int, nargs='+', metavar='N', help='NaFlex training sequence lengths')
    add(group, 'naflex_max_seq_len', type=int, metavar='N', help='NaFlex validation sequence length (default: 576)')
    add(group, 'naflex_patch_sizes', type=int, nargs='+', metavar='N', help='NaFlex patch sizes to sample')
    add(group, 'naflex_patch_size_probs', type=float, nargs='+', metavar='P', help='weights of --naflex-patch-sizes')
    add(group, 'naflex_loss_scale', type=str, choices=('none', 'sqrt', 'linear'),
        help='NaFlex: scale the loss by the batch size (default: linear)')
    add(group, 'naflex_patchify_channels_first', action='store_true', help='NaFlex: channels-first patches')

    _add_tffd_arguments(parser, table)
    _add_teacher_arguments(parser, table)
    return config_parser, parser, table


class _ParseKwargs(utils.ParseKwargs):
    """timm's KEY=VALUE argument action, with a usage error instead of a traceback for a token without '='."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if v and '=' not in v]
        if bad:
            parser.error(f'argument {option_string}: expected KEY=VALUE, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose error messages can name where the arguments came from (a ``-c`` config)."""
    source = ''

    def error(self, message):
        super().error(f'{self.source}{message}')


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse a timm-style command line (with an optional ``-c`` YAML config); returns ``(args, args_text)``."""
    config_parser, parser, table = _build_parsers()
    teacher_defaults = {k: parser.get_default(k) for k in _TEACHER_FLAGS}
    args_config, remaining = config_parser.parse_known_args(argv)
    config_tokens = []
    if args_config.config:
        try:
            config_tokens, positional = config_argv(load_config(args_config.config), table.actions,
                                                    args_config.config)
        except (OSError, ValueError, yaml.YAMLError) as e:
            parser.error(str(e))
        parser.set_defaults(**positional)
        parser.source = f'config {args_config.config}: '
        parser.parse_args(config_tokens)  # the config alone: its errors name it
        parser.source = ''
    args = parser.parse_args(config_tokens + remaining)
    del args.config  # like timm's args.yaml, ours holds the arguments the config set, not its path
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    _check_args(args, parser)
    try:
        TfFDConfig.from_args(args)  # the Tf-FD flags are checked where build_task reads them
    except ValueError as e:
        parser.error(f'--tffd: {e}' if args.tffd else str(e))
    _check_teacher_args(args, parser, teacher_defaults)
    return args, args_text


def _check_args(args, parser: argparse.ArgumentParser):
    """Reject bad values and combinations before anything is created."""
    if args.data and args.data_dir and args.data != args.data_dir:
        parser.error(f'two data dirs given: {args.data!r} (positional) and --data-dir {args.data_dir!r}')
    args.data_dir = args.data_dir or args.data
    prefix, sep, name = args.dataset.partition('/')
    prefix = prefix.lower() if sep else ''
    if sep and prefix not in _DATASET_TYPES:
        parser.error(f'unknown dataset type {prefix!r} in --dataset {args.dataset!r}; types: '
                     f'{", ".join(_DATASET_TYPES)}')
    if not sep and args.dataset.lower() not in _FOLDER_DATASETS:
        parser.error(f'unknown dataset {args.dataset!r}: use "" for an image folder or .tar at the data dir, or '
                     f'<type>/<name> with type {", ".join(_DATASET_TYPES)}')
    if args.data_dir:
        if not os.path.exists(args.data_dir) and prefix not in _ROOTLESS_TYPES and not args.dataset_download:
            parser.error(f'data dir {args.data_dir!r} does not exist')
    elif args.dataset and prefix not in _ROOTLESS_TYPES:
        parser.error(f'--dataset {args.dataset!r} needs a data dir; give none (and no --dataset) to train on the '
                     f'embedded Fashion-MNIST subset')
    if ':' not in args.model and not is_model(args.model):
        parser.error(f'unknown model {args.model!r}; see timm.list_models()')
    for flag, path in (('--resume', args.resume), ('--initial-checkpoint', args.initial_checkpoint)):
        if path and not os.path.isfile(path):
            parser.error(f'{flag}: no checkpoint file at {path!r}')
    for flag, value in (('--max-train-samples', args.max_train_samples), ('--max-val-samples', args.max_val_samples)):
        if value is not None and value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.pad_crop < 0:
        parser.error(f'--pad-crop must be >= 0, got {args.pad_crop}')
    if args.pad_crop and args.no_aug:
        parser.error('--pad-crop is a training augmentation; it cannot go with --no-aug')
    for flag, value in (('--batch-size', args.batch_size), ('--epochs', args.epochs),
                        ('--grad-accum-steps', args.grad_accum_steps), ('--val-interval', args.val_interval),
                        ('--log-interval', args.log_interval)):
        if value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    for flag, value in (('--workers', args.workers), ('--recovery-interval', args.recovery_interval),
                        ('--checkpoint-hist', args.checkpoint_hist), ('--tta', args.tta),
                        ('--aug-repeats', args.aug_repeats), ('--mixup-off-epoch', args.mixup_off_epoch)):
        if value < 0:
            parser.error(f'{flag} must be >= 0, got {value}')
    _check_timm_combinations(args, parser)
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    device_type = args.device.split(':')[0]
    if device_type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device} requested but CUDA is not available; use --device cpu')
    if args.sync_bn and device_type != 'cuda':
        parser.error('--sync-bn cannot be used with --device cpu: torch\'s SyncBatchNorm runs on CUDA only')


def _check_timm_combinations(args, parser: argparse.ArgumentParser):
    """The combinations timm's train.py refuses with an assert, and those the Tf-FD taps cannot follow: one message."""
    if args.aug_splits == 1 or args.aug_splits < 0:
        parser.error(f'--aug-splits must be 0 (off) or >= 2, got {args.aug_splits}')
    if args.jsd_loss and args.aug_splits < 2:
        parser.error('--jsd-loss needs --aug-splits 2 or more (the JSD is taken between the augmentation splits)')
    if args.jsd_loss and (args.bce_loss or args.smoothing_schedule != 'constant'):
        parser.error('--jsd-loss is its own loss: it cannot go with --bce-loss or --smoothing-schedule')
    if args.split_bn and args.aug_splits < 2 and not args.resplit:
        parser.error('--split-bn needs --aug-splits 2 or more (or --resplit)')
    if args.split_bn and args.sync_bn:
        parser.error('--split-bn cannot go with --sync-bn')
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.aug_splits > 1 and not args.no_prefetcher:
        parser.error('mixup / cutmix with --aug-splits needs --no-prefetcher (timm\'s collate cannot mix the splits)')
    if args.aug_splits > 1 and args.pad_crop:
        parser.error('--pad-crop cannot go with --aug-splits')
    if args.model_dtype and args.model_dtype != 'float32' and args.amp:
        parser.error('--amp needs a float32 model: leave out --model-dtype or --amp')
    if args.torchscript and (args.tffd or args.sfd):
        parser.error('--torchscript cannot keep the Tf-FD / SFD feature taps (Python forward hooks and a Python '
                     'forward); use --torchcompile instead')
    if args.torchscript and args.sync_bn:
        parser.error('--torchscript cannot go with --sync-bn')
    if args.naflex_loader and args.train_img_sizes:
        parser.error('--naflex-loader and --train-img-sizes are alternative loaders: give one')
    if args.naflex_loader and args.use_multi_epochs_loader:
        parser.error('--use-multi-epochs-loader does not work with --naflex-loader')
    if args.naflex_loader and args.aug_splits > 1:
        parser.error('--aug-splits does not work with --naflex-loader')
    if args.naflex_loader and (args.tffd or args.sfd):
        parser.error('--tffd / --sfd need image batches whose feature maps have a spatial layout; the NaFlex loader '
                     'gives variable-length patch sequences')
    if args.naflex_loader and args.pad_crop:
        parser.error('--pad-crop does not work with --naflex-loader')
    if args.naflex_patch_size_probs and len(args.naflex_patch_size_probs) != len(args.naflex_patch_sizes or ()):
        parser.error('--naflex-patch-size-probs needs one probability per --naflex-patch-sizes entry')
    if args.wandb_resume_id and not args.resume:
        parser.error('--wandb-resume-id continues a wandb run: it needs --resume')
    if args.kd_distill_type != 'logit' and args.sfd:
        parser.error(f'--sfd is its own feature distillation: it cannot go with --kd-distill-type '
                     f'{args.kd_distill_type}')


_TEACHER_FLAGS = ('teacher_checkpoint', 'teacher_mean', 'teacher_std', 'sfd', 'sfd_weight', 'distill_loss_weight',
                  'task_loss_weight', 'kd_temperature')


def _check_teacher_args(args, parser: argparse.ArgumentParser, defaults: Dict[str, object]):
    """Teacher, SFD, SD/RSD and dynamic smoothing flags: valid values and combinations that make sense."""
    if not args.kd_model_name:
        changed = [k for k in _TEACHER_FLAGS if getattr(args, k) != defaults[k]]
        if changed:
            flags = ', '.join('--' + k.replace('_', '-') for k in changed)
            parser.error(f'{flags} need a teacher (--teacher NAME)')
    try:
        args.sd_tau = parse_tau(args.sd_tau)
    except ValueError as e:
        parser.error(f'--sd-tau: {e}')
    if args.smoothing_schedule == 'constant':
        if args.smoothing_end is not None:
            parser.error('--smoothing-end needs --smoothing-schedule linear or cosine')
    else:
        if args.bce_loss:
            parser.error(f'--smoothing-schedule {args.smoothing_schedule} works with softmax cross-entropy, not '
                         f'--bce-loss')
        for flag, value in (('--smoothing', args.smoothing), ('--smoothing-end', args.smoothing_end)):
            if value is not None and not 0 <= value < 1:
                parser.error(f'{flag} must be in [0, 1) for a smoothing schedule, got {value}')


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------

def _create_teacher(args, data_config, device):
    """The frozen teacher (timm's ``DistillationTeacher``), or ``None`` without ``--teacher``."""
    if not args.kd_model_name:
        return None
    mean, std = args.teacher_mean, args.teacher_std
    if args.teacher_checkpoint and mean is None:  # trained by this pipeline: the student's normalization
        mean, std = data_config['mean'], data_config['std']
    return create_teacher(args.kd_model_name, args.teacher_checkpoint, num_classes=args.num_classes,
                          in_chans=data_config['input_size'][0], mean=mean, std=std, device=device)


def build_task(args, model: torch.nn.Module, criterion: torch.nn.Module, device: torch.device,
               data_config: dict, dtype: Optional[torch.dtype] = None) -> TrainingTask:
    """The training task; the one place that decides what a training step computes.

    ========================================  ==================================================================
    flags                                     task
    ========================================  ==================================================================
    (none)                                    timm ``ClassificationTask``
    ``--tffd``                                ``TfFDTask``
    ``--teacher``                             timm ``LogitDistillationTask`` (``TfFDLogitDistillationTask`` with
                                              ``--tffd``)
    ``--teacher --kd-distill-type feature``   timm ``FeatureDistillationTask`` (``TfFDFeatureDistillationTask``)
    ``--teacher --kd-distill-type token``     timm ``TokenDistillationTask`` (``TfFDTokenDistillationTask``)
    ``--teacher --sfd``                       ``SFDTask`` (with Tf-FD terms with ``--tffd``)
    ========================================  ==================================================================

    ``--self-distill`` adds the SD / RSD step (``build_self_distill``) to any of them. The loop calls
    ``task.set_epoch(epoch)`` (or the criterion's) before each epoch, and saves ``task.get_task_state()`` in every
    checkpoint.
    """
    verbose = utils.is_primary(args)
    tffd = TfFDConfig.from_args(args)
    teacher = _create_teacher(args, data_config, device)
    if args.sfd:
        return SFDTask(
            model, teacher=teacher, integrator=args.sfd, sfd_weight=args.sfd_weight, criterion=criterion, tffd=tffd,
            student_mean=data_config['mean'], student_std=data_config['std'], device=device, verbose=verbose)
    if teacher is not None:
        # timm's KD tasks read the student's normalization from its pretrained cfg: make it the one trained with
        model.pretrained_cfg = dict(model.pretrained_cfg, mean=data_config['mean'], std=data_config['std'])
        kd = dict(distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight, device=device,
                  dtype=dtype, verbose=verbose)
        if args.kd_distill_type == 'feature':
            kd.update(student_feature_dim=args.kd_student_feature_dim, teacher_feature_dim=args.kd_teacher_feature_dim)
            if tffd:
                return TfFDFeatureDistillationTask(model, teacher, criterion, tffd=tffd, **kd)
            return FeatureDistillationTask(model, teacher, criterion, **kd)
        if args.kd_distill_type == 'token':
            kd.update(distill_type=args.kd_token_distill_type, temperature=args.kd_temperature)
            if tffd:
                return TfFDTokenDistillationTask(model, teacher, criterion, tffd=tffd, **kd)
            return TokenDistillationTask(model, teacher, criterion, **kd)
        kd.update(loss_type=args.kd_loss_type, temperature=args.kd_temperature)
        if tffd:
            return TfFDLogitDistillationTask(model, teacher, criterion, tffd=tffd, **kd)
        return LogitDistillationTask(model, teacher, criterion, **kd)
    if tffd:
        return TfFDTask(model, criterion, tffd=tffd, device=device, dtype=dtype, verbose=verbose)
    return ClassificationTask(model, criterion, device=device, dtype=dtype, verbose=verbose)


def build_self_distill(args, task: TrainingTask) -> Optional[SelfDistill]:
    """The SD / RSD end-of-epoch step on the task's trainable module, or ``None`` without ``--self-distill``."""
    if not args.self_distill:
        return None
    return SelfDistill(task.get_trainable_module(), args.self_distill, args.sd_tau, args.epochs, seed=args.seed)


@dataclass
class _Loop:
    """What the training loop needs besides the task, loader and optimizer."""
    args: argparse.Namespace
    device: torch.device
    amp_autocast: object
    loss_scaler: Optional[NativeScaler]
    model_dtype: Optional[torch.dtype] = None
    mixup_fn: Optional[Mixup] = None  # --no-prefetcher: mixup / cutmix in the loop
    saver: Optional[AtomicCheckpointSaver] = None  # recovery checkpoints
    output_dir: Optional[str] = None  # --save-images
    batch_size_reference: float = 1.  # variable-size batches: the loss is scaled relative to this


class _SetupError(Exception):
    """Bad input found while building the run: reported as one line, before any output is written."""


def _load_failure(what: str, e: Exception) -> str:
    """One line for a file that could not be loaded: what, the error, and what an unpickling error means here."""
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
    message = f'{what}: {type(e).__name__}{": " + text if text else ""}'
    corrupt = (pickle.UnpicklingError, EOFError, IndexError, UnicodeDecodeError)
    if isinstance(e, corrupt) or 'central directory' in text or \
            'deserializing header' in text:
        message += (' (an empty, truncated or corrupt file, or one that pickles objects other than tensors: weights '
                    'are only read with weights_only=True or from safetensors)')
    return message


def _apply_embedded_defaults(args):
    for key, value in EMBEDDED_DATA_CONFIG.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)


def _create_dataset(args, split: str, is_training: bool, img_mode: str):
    cap = args.max_train_samples if is_training else args.max_val_samples
    try:
        if uses_embedded_data(args.data_dir, args.dataset):
            dataset = EmbeddedFashionMNIST(split, img_mode)
        else:
            dataset = create_dataset(
                args.dataset,
                root=args.data_dir,
                split=split,
                is_training=is_training,
                class_map=args.class_map,
                download=args.dataset_download,
                batch_size=args.batch_size,
                seed=args.seed,
                repeats=args.epoch_repeats if is_training else 0,
                input_img_mode=img_mode,
                input_key=args.input_key,
                target_key=args.target_key,
                num_samples=args.train_num_samples if is_training else args.val_num_samples,
                trust_remote_code=args.dataset_trust_remote_code,
            )
        if cap is not None:
            dataset = SampledSubset(dataset, cap, seed=args.seed)
    except Exception as e:  # timm and torchvision report a bad name or root with many exception types
        embedded = uses_embedded_data(args.data_dir, args.dataset)
        source = 'the embedded data' if embedded else f'{args.dataset or "folder"} at {args.data_dir!r}'
        raise _SetupError(f'cannot load split {split!r} of {source}: {type(e).__name__}: {e}') from e
    return dataset


def _dataset_attr(dataset, name: str):
    """An attribute of a dataset, of its timm reader, or of the dataset a subset wraps."""
    for obj in (dataset, getattr(dataset, 'reader', None), getattr(dataset, 'dataset', None)):
        if obj is not None and getattr(obj, name, None) is not None:
            return getattr(obj, name)
    return None


def _num_dataset_classes(dataset) -> Optional[int]:
    for name in ('class_to_idx', 'classes'):
        value = _dataset_attr(dataset, name)
        if value is not None and not callable(value):
            return len(value)
    inner = getattr(dataset, 'dataset', None)
    return _num_dataset_classes(inner) if inner is not None else None


def _check_datasets(args, dataset_train, dataset_eval):
    """A class count below the dataset's is refused before training; a validation split that timm resolved to a
    folder holding the training images (no such split folder) is named in a warning."""
    found = _num_dataset_classes(dataset_train)
    if found is not None and args.num_classes is not None and args.num_classes < found:
        raise _SetupError(f'the training split has {found} classes but the model has {args.num_classes} outputs '
                          f'(--num-classes {args.num_classes}); give --num-classes {found} or more')
    if dataset_eval is None:
        return
    train_root, eval_root = _dataset_attr(dataset_train, 'root'), _dataset_attr(dataset_eval, 'root')
    if isinstance(train_root, str) and isinstance(eval_root, str) and os.path.isdir(eval_root):
        train_root, eval_root = os.path.abspath(train_root), os.path.abspath(eval_root)
        if os.path.commonpath([train_root, eval_root]) == eval_root:
            _logger.warning(f'No {args.val_split!r} split under {args.data_dir!r}: timm reads {eval_root!r}, which '
                            f'holds the training images, so the validation metrics are on training data. Give '
                            f'--val-split with the right folder, or --val-split "" for no validation.')


def _create_model(args, in_chans: int) -> torch.nn.Module:
    kwargs = {}
    if args.pretrained_path:  # as timm: the file replaces the pretrained weights' source, the head is adapted
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    try:
        model = create_model(
            args.model,
            pretrained=args.pretrained or bool(args.pretrained_path),  # timm ignores the file without --pretrained
            in_chans=in_chans,
            num_classes=args.num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block,
            global_pool=args.gp,
            bn_momentum=args.bn_momentum,
            bn_eps=args.bn_eps,
            scriptable=args.torchscript,
            checkpoint_path=args.initial_checkpoint,
            **kwargs,
            **args.model_kwargs,
        )
    except TypeError as e:  # e.g. drop_block_rate, which only the resnet / byobnet families take
        raise _SetupError(f'model {args.model} does not accept an option given by --drop-block, --drop-path or '
                          f'--model-kwargs ({e})') from e
    except Exception as e:  # a bad name or config, or a weights file (--initial-checkpoint, --pretrained-path)
        files = ', '.join(f for f in (args.initial_checkpoint, args.pretrained_path) if f)
        raise _SetupError(_load_failure(f'cannot create model {args.model}' + (f' from {files}' if files else ''), e)) \
            from e
    if args.head_init_scale is not None or args.head_init_bias is not None:
        head = model.get_classifier()
        with torch.no_grad():
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                head.bias.fill_(args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def _check_input_size(model: torch.nn.Module, input_size: tuple, device: torch.device, dtype: Optional[torch.dtype]):
    """One eval-mode forward of a single zero image: a model that cannot take the data's input size (a ViT built
    for 224 px fed 32 px images) is named here, with what to do, instead of failing inside the first step."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except (RuntimeError, AssertionError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _SetupError(
            f'model {model.__class__.__name__} cannot take inputs of size {tuple(input_size)} ({message}). Models '
            f'built for a fixed size (ViT-style patch embeddings) take the size at construction: add '
            f'--model-kwargs img_size={input_size[-1]}') from e
    finally:
        model.train(was_training)


def _mixup_args(args) -> dict:
    return dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing if args.smoothing_schedule == 'constant' else 0.,
        num_classes=args.num_classes)


def _create_loaders(args, data_config, dataset_train, dataset_eval, loop: _Loop, mixup_active: bool,
                    model_patch_size=None):
    """timm's loaders with train.py's settings: the prefetcher (with FastCollateMixup) or mixup in the loop,
    AugMix splits, repeated augmentation, variable-resolution batches, or timm's NaFlex loader."""
    common = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem,
                  img_dtype=loop.model_dtype or torch.float32, device=loop.device, distributed=args.distributed,
                  use_prefetcher=args.prefetcher)
    train_kwargs = dict(
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats,
        num_aug_splits=args.aug_splits,
        interpolation=args.train_interpolation if args.train_interpolation and not args.no_aug
        else data_config['interpolation'],
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
    )
    if args.naflex_loader:
        patch_kwargs = dict(patch_size=model_patch_size or (16, 16))
        if args.naflex_patch_sizes:
            patch_kwargs = dict(patch_size_choices=args.naflex_patch_sizes)
            if args.naflex_patch_size_probs:
                patch_kwargs['patch_size_choice_probs'] = args.naflex_patch_size_probs
        naflex_mixup = None
        if mixup_active:
            naflex_mixup = NaFlexMixup(**{k: v for k, v in _mixup_args(args).items()
                                          if k not in ('mode', 'cutmix_minmax')})
        loader_train = create_naflex_loader(
            dataset=dataset_train, train_seq_lens=args.naflex_train_seq_lens, mixup_fn=naflex_mixup,
            rank=args.rank, world_size=args.world_size,
            patchify_channels_last=not args.naflex_patchify_channels_first, **patch_kwargs, **common, **train_kwargs)
    else:
        collate_fn = None
        if mixup_active:
            if args.prefetcher:
                collate_fn = FastCollateMixup(**_mixup_args(args))
            else:
                loop.mixup_fn = Mixup(**_mixup_args(args))
        if args.aug_splits > 1:
            dataset_train = AugMixDataset(dataset_train, num_splits=args.aug_splits)
        loader_train = create_loader(
            dataset_train,
            input_size=data_config['input_size'],
            input_size_choices=args.train_img_sizes,
            batch_size_choices=args.train_batch_sizes,
            batch_choice_weights=args.train_size_probs,
            batch_choice_seed=args.seed,
            batch_choice_schedule=args.train_size_schedule,
            batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
            batch_schedule_spread=args.train_size_schedule_spread,
            batch_schedule_random_mix=args.train_size_random_mix,
            num_batches=args.train_batches_per_epoch,
            collate_fn=collate_fn,
            use_multi_epochs_loader=args.use_multi_epochs_loader,
            **common,
            **train_kwargs,
        )
        if args.pad_crop:  # before timm's transform, which then only flips, converts and normalizes (see --pad-crop)
            loader_train.dataset.transform.transforms.insert(
                0, transforms.RandomCrop(data_config['input_size'][-2:], padding=args.pad_crop))
    loop.batch_size_reference = float(args.batch_size)
    if args.train_img_sizes:
        loop.batch_size_reference = loader_train.batch_sampler.average_batch_size
    if len(loader_train) == 0:
        raise _SetupError(f'the training split ({len(dataset_train)} samples over {args.world_size} process(es)) is '
                          f'smaller than one batch of {args.batch_size} per process; lower --batch-size')
    loader_eval = None
    if dataset_eval is not None:
        eval_kwargs = dict(batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                           interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                           num_workers=args.workers)
        if args.naflex_loader:
            loader_eval = create_naflex_loader(
                dataset=dataset_eval, patch_size=model_patch_size or (16, 16), max_seq_len=args.naflex_max_seq_len,
                patchify_channels_last=not args.naflex_patchify_channels_first, **common, **eval_kwargs)
        else:
            loader_eval = create_loader(dataset_eval, input_size=data_config['input_size'], **common, **eval_kwargs)
    return loader_train, loader_eval


def _resolve_lr(args, batch_size_reference: float):
    """timm's rule: without --lr, scale --lr-base by the global batch (accumulated batches included) relative to
    --lr-base-size."""
    if args.lr:
        return
    global_batch = batch_size_reference * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) from base learning rate ({args.lr_base}) and global batch size '
                     f'({global_batch:g}) with {args.lr_base_scale} scaling.')


def _create_criterion(args, mixup_active: bool) -> torch.nn.Module:
    """timm train.py's training loss: JSD over AugMix splits, soft-target CE / BCE with mixup, label smoothing; or
    dynamic label smoothing (--smoothing-schedule)."""
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if args.smoothing_schedule != 'constant':  # mixup's own smoothing is off then: the schedule smooths the targets
        return DynamicLabelSmoothingCrossEntropy(
            args.smoothing, args.smoothing_end, args.smoothing_schedule, epochs=args.epochs)
    return create_classification_loss(
        loss_type='bce' if args.bce_loss else 'ce', smoothing=args.smoothing, soft_targets=mixup_active,
        bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight)


def _epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws its random numbers from (seed, epoch, rank) alone, so a resumed run repeats them."""
    return hash((seed, epoch)) % (2 ** 31)


def _set_loader_epoch(loader, epoch: int):
    for obj in (loader.dataset, getattr(loader, 'sampler', None)):
        if hasattr(obj, 'set_epoch'):
            obj.set_epoch(epoch)


@dataclass
class _Setup:
    """Everything ``_build`` creates for the loop."""
    task: TrainingTask
    eval_model: torch.nn.Module
    loader_train: object
    loader_eval: Optional[object]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Optional[object]  # None with --sched none
    num_epochs: int
    updates_per_epoch: int
    eval_metric: str
    input_size: tuple
    resume_epoch: Optional[int]
    self_distill: Optional[SelfDistill]


@dataclass
class TrainResult:
    """What ``train()`` returns: the task (its model and EMA; under ``torch.distributed`` its trainable module is
    unwrapped from DDP, whose process group is gone by then), the output folder and the per-epoch metrics."""
    task: TrainingTask
    output_dir: Optional[str]
    results: List[dict] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None


# ------------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------------

def _format_terms(values: Dict[str, float]) -> str:
    return '  '.join(f'{k}: {v:#.4g}' for k, v in values.items() if k != 'loss')


def updates_per_epoch(num_batches: int, accum_steps: int) -> int:
    """Optimizer updates in an epoch of ``num_batches`` batches with gradient accumulation (the last may be short)."""
    return (num_batches + accum_steps - 1) // accum_steps


def _batch_size(input) -> int:
    return input['patches'].shape[0] if isinstance(input, dict) else input.shape[0]


def train_one_epoch(epoch, task, loader, optimizer, lr_scheduler, loop: _Loop):
    """One pass over ``loader``; returns the epoch means of every scalar the task reports (over all ranks)."""
    args = loop.args
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if loop.mixup_fn is not None:
            loop.mixup_fn.mixup_enabled = False
        elif getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
    task.get_trainable_module().train()
    meter = LossMeter()
    primary = utils.is_primary(args)
    bar, log_context = None, nullcontext()
    if primary and sys.stdout.isatty():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
        bar = tqdm(total=len(loader), desc=f'Train {epoch}', file=sys.stdout, leave=False, dynamic_ncols=True)
        log_context = logging_redirect_tqdm()  # log lines go above the bar instead of through it
    with log_context:
        _train_steps(epoch, task, loader, optimizer, lr_scheduler, loop, meter, bar)
    if bar is not None:
        bar.close()
    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    return meter.averages(args.distributed)


def _loss_scale(args, loop: _Loop, input) -> float:
    """timm's loss scaling for variable-size batches (NaFlex, --train-img-sizes): 1 for fixed batches."""
    if not (args.naflex_loader or args.train_img_sizes):
        return 1.
    mode = args.naflex_loss_scale if args.naflex_loader else args.variable_batch_loss_scale
    batch = _batch_size(input)
    scale = 1. if mode == 'none' else batch / loop.batch_size_reference
    scale = scale ** 0.5 if mode == 'sqrt' else scale
    if args.naflex_loader and args.distributed:  # ranks' batches differ: weight each by its share of the global one
        global_batch = utils.reduce_tensor(torch.tensor(float(batch), device=loop.device), 1)
        scale = scale * (args.world_size * batch / global_batch)  # a tensor: no host read
    return scale


def _train_steps(epoch, task, loader, optimizer, lr_scheduler, loop: _Loop, meter: LossMeter, bar):
    """timm's step: forward (the task), loss / accumulation steps, backward, clipping, optimizer step every
    ``--grad-accum-steps`` batches (DDP syncs gradients only then), EMA update, schedule update."""
    args = loop.args
    second_order = getattr(optimizer, 'is_second_order', False)
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    num_updates_epoch = updates_per_epoch(num_batches, accum_steps)
    num_updates = epoch * num_updates_epoch
    short_from = num_batches - num_batches % accum_steps  # the batches of a last, shorter accumulation
    update_time = utils.AverageMeter()
    data_time = utils.AverageMeter()
    primary = utils.is_primary(args)
    optimizer.zero_grad()
    end = data_start = time.time()
    for step, (input, target) in enumerate(loader):
        last = step == num_batches - 1
        need_update = last or (step + 1) % accum_steps == 0
        update_idx = step // accum_steps
        micro_steps = num_batches % accum_steps if step >= short_from else accum_steps
        if not args.prefetcher:
            input, target = _to_device(input, loop), target.to(loop.device)
            if loop.mixup_fn is not None:
                input, target = loop.mixup_fn(input, target)
        if args.channels_last and not isinstance(input, dict):
            input = input.contiguous(memory_format=torch.channels_last)
        data_time.update(time.time() - data_start)

        with nullcontext() if need_update else task.no_sync():  # DDP: gradients are reduced at updates only
            with loop.amp_autocast():
                result = task(input, target)
            loss, factor = result['loss'], _loss_scale(args, loop, input) / micro_steps
            if torch.is_tensor(factor) or factor != 1:
                loss = loss * factor
            _backward(task, loss, optimizer, loop, need_update, second_order)
        meter.update(result, _batch_size(input))
        if bar is not None:
            bar.update()
        data_start = time.time()
        if not need_update:
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if args.synchronize_step and loop.device.type == 'cuda':
            torch.cuda.synchronize()
        update_time.update(time.time() - end)

        if update_idx % args.log_interval == 0 or last:
            latest, means = meter.latest(args.distributed), meter.averages(args.distributed)
            _check_diverged(means, meter, epoch, task, input)
            if primary:
                lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
                samples = _batch_size(input) * micro_steps * args.world_size
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{num_updates_epoch} '
                    f'({100. * (update_idx + 1) / num_updates_epoch:>3.0f}%)]  '
                    f'Loss: {latest["loss"]:#.3g} ({means["loss"]:#.3g})  {_format_terms(means)}  '
                    f'Time: {update_time.val:.3f}s, {samples / update_time.val:>7.2f}/s  '
                    f'LR: {lr:.3e}  Data: {data_time.val:.3f} ({data_time.avg:.3f})')
                if args.save_images and loop.output_dir and not isinstance(input, dict):
                    torchvision.utils.save_image(
                        input, os.path.join(loop.output_dir, f'train-batch-{step}.jpg'), padding=0, normalize=True)
        if bar is not None and (update_idx % _BAR_REFRESH == 0 or last):
            bar.set_postfix(OrderedDict((k, f'{v:.4g}') for k, v in meter.averages().items()))
        if loop.saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            _write_output(loop.saver.save_recovery, epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        end = data_start = time.time()


def _to_device(input, loop: _Loop):
    if isinstance(input, dict):  # NaFlex patches
        return {k: v.to(loop.device, dtype=loop.model_dtype) if v.is_floating_point() else v.to(loop.device)
                for k, v in input.items()}
    return input.to(loop.device, dtype=loop.model_dtype)


def _backward(task, loss, optimizer, loop: _Loop, need_update: bool, second_order: bool):
    """Backward; at an update, clip (``--clip-grad`` / ``--clip-mode``) and step. With a loss scaler, timm's
    ``NativeScaler`` does all of it (unscaling before clipping)."""
    args = loop.args
    clip_parameters = None
    if args.clip_grad is not None:
        clip_parameters = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if loop.loss_scaler is not None:
        loop.loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                         parameters=clip_parameters, create_graph=second_order, need_update=need_update)
        return
    loss.backward(create_graph=second_order)
    if need_update:
        if args.clip_grad is not None:
            utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
        optimizer.step()


class _Diverged(FloatingPointError):
    """Non-finite losses or weights: the run stops, and nothing non-finite is saved."""


def _check_diverged(means: Dict[str, float], meter: LossMeter, epoch: int, task: TrainingTask, input: torch.Tensor):
    """Stop on a non-finite epoch mean (read where the loop reads its values anyway, never per step)."""
    if all(math.isfinite(v) for v in means.values()):
        return
    found = meter.nonfinite()  # this rank's first non-finite step, tracked on the device
    where = f'at step {found[0]}' if found else 'on another rank'
    names = found[1] if found else [k for k, v in means.items() if not math.isfinite(v)]
    message = f'training diverged in epoch {epoch} {where}: non-finite {", ".join(names)}'
    model = task.get_eval_model()
    if is_wrapped(model):
        stages = diagnose_nonfinite(model, input)
        message += (f'; tapped features not finite at stage(s) {", ".join(stages)}' if stages else
                    '; the tapped features of the current batch are finite')
    raise _Diverged(message)


def _check_finite_weights(task: TrainingTask, epoch: int):
    """Before a checkpoint: the weights must be finite (one host read per epoch)."""
    params = list(task.get_trainable_module().named_parameters())
    if bool(torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).all()):
        return
    bad = [n for n, p in params if not bool(torch.isfinite(p.detach()).all())]
    raise _Diverged(f'training diverged in epoch {epoch}: non-finite weights in {", ".join(bad[:5])}'
                    f'{" and others" if len(bad) > 5 else ""}')


def validate(model, loader, evaluator, loop: _Loop, log_suffix: str = '') -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole split (over all ranks, without the distributed sampler's padding)."""
    args = loop.args
    model.eval()
    evaluator.reset()
    last_idx = len(loader) - 1
    with torch.inference_mode():
        for step, (input, target) in enumerate(loader):
            if not args.prefetcher:
                input, target = _to_device(input, loop), target.to(loop.device)
            if args.channels_last and not isinstance(input, dict):
                input = input.contiguous(memory_format=torch.channels_last)
            with loop.amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            if args.tta > 1:  # each image comes args.tta times in a row: average their outputs
                output = output.unfold(0, args.tta, args.tta).mean(dim=2)
                target = target[0:target.size(0):args.tta]
            evaluator.update(output, target)
            if utils.is_primary(args) and (step == last_idx or step % args.log_interval == 0):
                running = evaluator.summary()
                _logger.info(f'Test{log_suffix}: [{step:>4d}/{last_idx}]  Loss: {running["loss"]:>7.3f}  '
                             f'Acc@1: {running["top1"]:>7.3f}  Acc@5: {running["top5"]:>7.3f}')
    return evaluator.compute(distributed=args.distributed)


def train(args, args_text: str) -> TrainResult:
    """Build everything from parsed arguments and train; see the module docstring."""
    for module in args.device_modules or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise SystemExit(f'error: --device-modules: cannot import {module!r}: {e}') from None
    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    primary = utils.is_primary(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    else:
        _logger.info(f'Training with a single process on {args.device}.')
    if device.type == 'cuda':  # as timm's train.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()

    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if device.type == 'cpu' or args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
        if primary:
            _logger.info(f'Mixed precision: autocast to {amp_dtype}.')
    elif primary:
        _logger.info(f'Training in {model_dtype or torch.float32}.')
    loop = _Loop(args, device, amp_autocast, loss_scaler, model_dtype)

    try:
        setup = _build(args, loop)
    except _SetupError as e:
        if args.distributed:
            torch.distributed.destroy_process_group()
        raise SystemExit(f'error: {e}') from None
    return _run(args, args_text, setup, loop)


def _build(args, loop: _Loop) -> _Setup:
    """Model, data, task, optimizer and resume state, in timm train.py's order. Raises ``_SetupError`` on bad input."""
    primary = utils.is_primary(args)
    device = loop.device
    if uses_embedded_data(args.data_dir, args.dataset):
        _apply_embedded_defaults(args)
        if primary:
            _logger.info('No data dir: training on the embedded Fashion-MNIST subset (4000 train / 1000 val images).')
    # Initialize the weights identically on every rank (timm seeds with seed + rank here and relies on DDP's
    # broadcast, which does not reach an EMA copy made before the DDP wrap).
    utils.random_seed(args.seed, 0)
    in_chans = 3
    if args.in_chans is not None:
        in_chans = args.in_chans
    elif args.input_size is not None:
        in_chans = args.input_size[0]
    model = _create_model(args, in_chans)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    if args.split_bn:
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=loop.model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if not args.naflex_loader:
        _check_input_size(model, data_config['input_size'], device, loop.model_dtype)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # SyncBatchNorm keeps the statistics in sync already
        model = convert_sync_batchnorm(model)
    model_patch_size = model.get_patch_size() if args.naflex_loader and hasattr(model, 'get_patch_size') else None
    if args.torchscript:
        model = torch.jit.script(model)

    img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train = _create_dataset(args, args.train_split, True, img_mode)
    dataset_eval = _create_dataset(args, args.val_split, False, img_mode) if args.val_split else None
    _check_datasets(args, dataset_train, dataset_eval)

    if args.aug_repeats and not args.distributed:
        raise _SetupError('--aug-repeats needs distributed training (timm\'s RepeatAugSampler splits the repeats '
                          'across processes); launch with torchrun, or leave it out')
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    loader_train, loader_eval = _create_loaders(
        args, data_config, dataset_train, dataset_eval, loop, mixup_active, model_patch_size)
    _resolve_lr(args, loop.batch_size_reference)
    criterion = _create_criterion(args, mixup_active)
    try:
        task = build_task(args, model, criterion, device, data_config, loop.model_dtype)
    except Exception as e:
        if isinstance(e, (ValueError, OSError)) and not isinstance(e, UnicodeDecodeError):
            raise _SetupError(f'{args.model}: {e}') from e  # stages, taps, saliency or a teacher that do not fit
        # a teacher checkpoint that does not load (a corrupt file can fail to decode a string: a ValueError too)
        raise _SetupError(_load_failure(f'cannot load the teacher {args.kd_model_name}'
                                        f'{" from " + args.teacher_checkpoint if args.teacher_checkpoint else ""}',
                                        e)) from e
    try:
        optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (ValueError, AssertionError, TypeError) as e:
        raise _SetupError(f'--opt {args.opt}: {e}') from e

    resume_epoch = None
    try:
        if args.resume:
            resume_epoch = resume_task_checkpoint(
                task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                loss_scaler=None if args.no_resume_opt else loop.loss_scaler, log_info=primary)
        if args.model_ema:
            task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                           device='cpu' if args.model_ema_force_cpu else None)
            if args.resume:
                load_task_ema_checkpoint(task, args.resume)
    except Exception as e:  # another model, not a training checkpoint, or not a readable file
        raise _SetupError(_load_failure(f'cannot resume from {args.resume}', e)) from e
    self_distill = build_self_distill(args, task)
    if self_distill is not None and resume_epoch:
        self_distill.resume(resume_epoch - 1)  # the checkpoint was written right after that epoch's SD step
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    num_updates = updates_per_epoch(len(loader_train), args.grad_accum_steps)
    try:  # after the resume, as in timm: the schedule starts from the checkpoint's initial lr
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=eval_metric == 'loss'),
            updates_per_epoch=num_updates)
    except (ValueError, AssertionError) as e:
        raise _SetupError(f'--sched {args.sched}: {e}') from e
    eval_model = task.get_eval_model()  # taken before the DDP wrap, as timm does: evaluation needs no DDP
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)
    return _Setup(task, eval_model, loader_train, loader_eval, optimizer, lr_scheduler, num_epochs, num_updates,
                  eval_metric, data_config['input_size'], resume_epoch, self_distill)


def _run(args, args_text, setup: _Setup, loop: _Loop) -> TrainResult:
    """The epoch loop: train, end-of-epoch task hook, BN sync, evaluation, checkpoint, summary row, lr step."""
    task, optimizer, loader_train, loader_eval = setup.task, setup.optimizer, setup.loader_train, setup.loader_eval
    lr_scheduler, eval_metric = setup.lr_scheduler, setup.eval_metric
    primary = utils.is_primary(args)
    start_epoch = args.start_epoch if args.start_epoch is not None else (setup.resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        # timm's schedulers are functions of the epoch (or update) count: stepping to it restores them
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * setup.updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    if primary:
        _logger.info(f'Scheduled epochs: {setup.num_epochs}; starting at epoch {start_epoch}.')
        if args.resume and args.sched == 'plateau':
            _logger.warning('The plateau scheduler\'s metric state is not in checkpoints (timm deprecates it): it '
                            'restarts on resume. Prefer a fixed schedule such as cosine.')

    output_dir, saver, has_wandb = None, None, False
    if primary:  # only now, with every input checked, does the run get a folder
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(setup.input_size[-1])])
        output_dir = os.path.join(args.output or './output/train', exp_name)
    created = output_dir is not None and not os.path.exists(output_dir)
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader_eval)) if loader_eval else None
    run = TrainResult(task, output_dir)
    saved = False
    try:
        if primary:
            saver = _open_output(args, args_text, setup, output_dir, start_epoch, loop.loss_scaler)
            loop.saver, loop.output_dir = saver, output_dir
            has_wandb = args.log_wandb and _init_wandb(args, exp_name)

        for epoch in range(start_epoch, setup.num_epochs):
            utils.random_seed(_epoch_seed(args.seed, epoch), args.rank)
            _set_loader_epoch(loader_train, epoch)
            epoch_aware = task if hasattr(task, 'set_epoch') else getattr(task, 'criterion', None)
            if hasattr(epoch_aware, 'set_epoch'):  # Tf-FD weight schedule, dynamic label smoothing
                epoch_aware.set_epoch(epoch)
            train_metrics = train_one_epoch(epoch, task, loader_train, optimizer, lr_scheduler, loop)
            _check_finite_weights(task, epoch)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            if setup.self_distill is not None:  # after the BN sync: every rank mixes the same weights
                update = setup.self_distill.step(epoch)
                if primary:
                    _logger.info(f'Epoch {epoch}: self-distillation {update}')
            if (epoch + 1) % args.val_interval != 0 and epoch + 1 != setup.num_epochs:
                if primary:
                    _logger.info(f'Epoch {epoch}: no validation or checkpoint (--val-interval {args.val_interval}).')
                if lr_scheduler is not None:
                    lr_scheduler.step(epoch + 1, None)
                run.results.append(dict(epoch=epoch, train=train_metrics, validation=None))
                continue

            eval_metrics = _evaluate(args, setup, evaluator, loop) if evaluator is not None else None
            if eval_metrics and not all(math.isfinite(v) for v in eval_metrics.values()):
                values = ', '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items())
                raise _Diverged(f'training diverged in epoch {epoch}: non-finite validation metrics ({values})')
            latest_metric = (eval_metrics or train_metrics)[eval_metric]

            if saver is not None:  # the row first: a kill before the checkpoint repeats the epoch, which replaces it
                lrs = [g['lr'] for g in optimizer.param_groups]
                _write_output(append_summary, os.path.join(output_dir, 'summary.csv'), epoch, train_metrics,
                              eval_metrics, lr=sum(lrs) / len(lrs), log_wandb=has_wandb)
                run.best_metric, run.best_epoch = _write_output(saver.save_checkpoint, epoch, metric=latest_metric)
                saved = True
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, latest_metric)
            run.results.append(dict(epoch=epoch, train=train_metrics, validation=eval_metrics))
            if primary and eval_metrics:
                _logger.info(f'Epoch {epoch}: {_format_terms(train_metrics)}  train loss {train_metrics["loss"]:.4f}  '
                             f'top-1 {eval_metrics["top1"]:.2f}  top-5 {eval_metrics["top5"]:.2f}')
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see main): never reported as a finished run
        name, code = ('SIGTERM', 143) if isinstance(e, _Terminated) else ('SIGINT', 130)
        done = f'{len(run.results)} epoch(s) of this run complete'
        resume = (f'; resume with --resume {os.path.join(output_dir, "last.pth.tar")}'
                  if output_dir and os.path.exists(os.path.join(output_dir, 'last.pth.tar')) else '')
        if primary:
            _logger.error(f'Interrupted by {name}: {done}{resume}')
        raise SystemExit(code) from None
    except _OutputError as e:
        last = os.path.join(output_dir, 'last.pth.tar')
        resume = f'; the last complete checkpoint is {last}' if os.path.exists(last) else ''
        raise SystemExit(f'error: {e}{resume}') from None
    except _Diverged as e:
        resume = f'; the last good checkpoint is {os.path.join(output_dir, "last.pth.tar")}' if saved else ''
        raise SystemExit(f'error: {e}. Lower the learning rate (or the loss weights), or train in float32{resume}') \
            from None
    except (ValueError, FloatingPointError) as e:  # an option that does not fit the feature maps
        _logger.debug('training stopped', exc_info=True)
        raise SystemExit(f'error: training stopped: {e}') from None
    finally:
        if created and os.path.isdir(output_dir) and not any(f.endswith('.pth.tar') for f in os.listdir(output_dir)):
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing resumable: leave no half-made run behind
        if args.distributed:
            _release_ddp(task)
            torch.distributed.destroy_process_group()

    if primary and run.results:
        final = run.results[-1]
        result = (f'top-1 {final["validation"]["top1"]:.2f}' if final['validation']
                  else f'train loss {final["train"]["loss"]:.4f}')
        _logger.info(f'Final {result} (epoch {final["epoch"]}); best {eval_metric}: {run.best_metric} '
                     f'(epoch {run.best_epoch}); output: {output_dir}')
    return run


def _release_ddp(task: TrainingTask):
    """Unwrap the task's trainable module from DDP before the process group goes: the task ``train()`` returns then
    runs without a process group, and the DDP wrapper, whose reducer holds the group, is freed when training returns,
    not kept by the result until the interpreter exits (where tearing down a gloo group's threads can abort the
    process)."""
    module = getattr(task, 'trainable_module', None)
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        task.trainable_module = module.module


class _OutputError(Exception):
    """A file of the run could not be written (a read-only or full disk, an output path that is a file)."""


def _write_output(fn, *args, **kwargs):
    """Call a function that writes the run's files; an ``OSError`` becomes one message naming the cause."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        path = e.filename or ''
        raise _OutputError(f'cannot write {path!r}: {e.strerror or e}' if path else f'cannot write the run\'s files: '
                           f'{e.strerror or e}') from e


def _open_output(args, args_text, setup: _Setup, output_dir: str, start_epoch: int, loss_scaler):
    """Create the output folder's saver and args.yaml; a resumed run keeps its checkpoint history and summary rows,
    and completes the bookkeeping of the epoch it resumes from (see ``AtomicCheckpointSaver.resume_from``)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise _OutputError(f'the output path {output_dir!r} is a file, not a folder')
    _write_output(os.makedirs, output_dir, exist_ok=True)
    saver = AtomicCheckpointSaver(
        model=setup.task.get_trainable_module(), optimizer=setup.optimizer, args=args, amp_scaler=loss_scaler,
        checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=setup.eval_metric == 'loss',
        max_history=args.checkpoint_hist, task=setup.task)
    if args.resume:
        _write_output(saver.resume_from, args.resume)
    _write_output(trim_summary_atomic, os.path.join(output_dir, 'summary.csv'), start_epoch)
    _write_output(atomic_write_text, os.path.join(output_dir, 'args.yaml'), args_text)
    return saver


def _evaluate(args, setup: _Setup, evaluator, loop: _Loop) -> Dict[str, float]:
    """Validate the model and, with --model-ema, the EMA model, whose metrics are then reported (as timm does; an EMA
    kept on the CPU with --model-ema-force-cpu is not validated)."""
    metrics = validate(setup.eval_model, setup.loader_eval, evaluator, loop)
    task = setup.task
    if task.has_ema() and not args.model_ema_force_cpu:
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
        metrics = validate(task.get_eval_model(ema=True), setup.loader_eval, evaluator, loop, log_suffix=' (EMA)')
    return metrics


def _init_wandb(args, exp_name: str) -> bool:
    try:
        import wandb
    except ImportError:
        _logger.warning('--log-wandb: the wandb package is not installed (pip install wandb); not logging to wandb.')
        return False
    wandb.init(project=args.wandb_project, name=exp_name, config=args, tags=args.wandb_tags,
               resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None)
    return True


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (exit status 143 instead of 130)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Command-line entry point; ``argv`` defaults to ``sys.argv[1:]``. Exits 130 on SIGINT, 143 on SIGTERM."""
    args, args_text = parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return train(args, args_text)
    except KeyboardInterrupt as e:  # before the epoch loop: nothing was written
        _logger.error(f'Interrupted by {"SIGTERM" if isinstance(e, _Terminated) else "SIGINT"} before training '
                      f'started')
        raise SystemExit(143 if isinstance(e, _Terminated) else 130) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    utils.setup_default_logging()
    main()

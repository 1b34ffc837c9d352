"""An accuracy testbed where regularizers can show, then every method measured in it.

``accuracy.py`` trains in an under-fitting regime (the training loss still falls at the last epoch), where established
regularizers show nothing either, so "Tf-FD does nothing" there is no finding. This stage first fixes a testbed in
which the baseline over-fits and a positive control holds, then measures every method in it:

1. **Testbed.** A fixed subset of the Fashion-MNIST training images (``MODES['testbed']``: 2,000 images, drawn once
   with a fixed seed), ``cifar_resnet8``, 30 epochs, SGD with a cosine schedule, batch 128, weight decay 5e-4, no
   augmentation (the recipe of ``accuracy.py``, with more epochs on less data). A *validation split* of other
   training images (2,000, disjoint from the training subset) is what every choice is made on; the official 10k test
   set is evaluated once per finished run, from its final checkpoint, and only the final table reads it.
2. **Baseline learning rate** (phase ``lr``): the baseline at each of ``LRS``, ``tune_seeds`` seeds, the rate with the
   highest mean final validation top-1 is used for every method.
3. **Positive control** (phase ``control``): baseline, label smoothing 0.1 and DropBlock 0.1 at every seed. The
   testbed is valid when one of the two gains on the validation split with a paired 95% interval above 0. The control
   is decided with these two alone, before any Tf-FD run; it does not change with Tf-FD's results.
4. **Tf-FD weight scale** (phase ``scale``): inter+intra at x1, x10 and x100 of the reference weights (0.005 inter /
   0.0004 intra, Tf-FD, Li, ECCV 2022), ``scale_seeds`` seeds, chosen by mean final validation top-1.
5. **Every method** (phase ``table``) at every seed, one configuration after the other in ``TABLE_ORDER`` (the Tf-FD
   rows first, the teacher-based ones last), so that each finished configuration is a complete row. KD and SFD-RI
   (Pei et al., IJCAI 2021) use a ``cifar_resnet20`` teacher trained on the same subset with the same recipe, one
   teacher per seed; its training time is recorded and added to their cost.

Every finished run leaves a small record (per-epoch training loss and terms, validation top-1, final test and train
top-1, wall time) in ``results/regularization_runs/``; a later call reuses them and only trains what is missing, so
the stage can run over several sittings::

    python benchmarks/regularization.py                          # all phases, resumable
    python benchmarks/regularization.py --no-start-after 07:12   # start no new training run after 07:12 UTC
    python benchmarks/regularization.py --report-only            # rewrite the report from the finished records

The report (``results/regularization.md``, ``.json``, ``_curves.png``, ``_gain_vs_cost.png``) is rewritten after every
finished run, with whatever is finished. Statistics: seeds are paired across configurations (the same seed gives the
same initialization and batch order; the training subset is the same for every seed), the gain's interval is the
paired t interval of ``accuracy.paired_gain``; with m comparisons against the baseline the table also gives the
Bonferroni interval (level 1 - 0.05 / m).
"""
import argparse
import csv
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.accuracy import (  # noqa: E402
    FASHION_MNIST, REPO, STUDENT, TEACHER, _tffd_weights, paired_gain, prepare_fashion_mnist, run_training, summarize)

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's, as accuracy.py
LRS = (0.1, 0.2, 0.4, 0.8)  # 0.8 added when 0.4, the largest of the first three, was best
SCALES = (1, 10, 100)
CONTROLS = ('label-smoothing', 'dropblock')
MODES = {
    # 2,000 training images x 30 epochs: about 2 minutes a student run at one thread (measured), the teacher about 3x
    'testbed': dict(train=2000, val=2000, test=0, epochs=30, seeds=5, tune_seeds=2, scale_seeds=3, batch=128,
                    lrs=LRS, scales=SCALES, wide_val=20000),
    # the smoke path of the tests: a few dozen images, one epoch
    'tiny': dict(train=48, val=32, test=64, epochs=1, seeds=2, tune_seeds=2, scale_seeds=2, batch=16,
                 lrs=(0.2,), scales=SCALES, wide_val=32),
}
# the table's order: the question first (Tf-FD), then the self-regularizing alternatives, the teacher-based ones last
TABLE_ORDER = ('tffd-inter+intra', 'tffd-inter+intra-xS', 'tffd-inter', 'tffd-intra', 'tffd+label-smoothing',
               'tffd+label-smoothing-xS', 'dynamic-label-smoothing', 'm2o', 'emd-l2', 'sd', 'rsd', 'kd', 'sfd-ri')


def scaled_name(base: str, scale: float) -> str:
    return base if scale == 1 else f'{base}-x{scale:g}'


def configurations(scale: float = 1.) -> 'OrderedDict[str, List[str]]':
    """Configuration name -> extra arguments on top of the shared recipe (which sets ``--smoothing 0``).

    ``scale``: the validated Tf-FD weight scale; its inter+intra and Tf-FD + label smoothing rows are added next to the
    reference-weight ones (x1 adds nothing). ``TEACHER`` stands for the seed's teacher checkpoint."""
    w1 = _tffd_weights(1.)
    teacher = ['--teacher', TEACHER, '--teacher-checkpoint', 'TEACHER']
    configs = OrderedDict([
        ('baseline', []),
        ('label-smoothing', ['--smoothing', '0.1']),
        ('dropblock', ['--drop-block', '0.1']),
        ('tffd-inter+intra', ['--tffd', 'inter,intra'] + w1),
        ('tffd-inter', ['--tffd', 'inter'] + w1[:2]),
        ('tffd-intra', ['--tffd', 'intra'] + w1[2:]),
        ('tffd+label-smoothing', ['--tffd', 'inter,intra', '--smoothing', '0.1'] + w1),
        # SFR's dynamic label smoothing, in the reading the library defaults to: 0.1 falling linearly to 0
        ('dynamic-label-smoothing', ['--smoothing', '0.1', '--smoothing-schedule', 'linear', '--smoothing-end', '0']),
        ('m2o', ['--tffd', 'm2o']),
        # EMD-l2 over every position of 28x28 maps is a 784-point problem per sample: pooled to a 7x7 grid
        ('emd-l2', ['--tffd', 'emd', '--tffd-emd-grid', '7']),
        ('sd', ['--self-distill', 'sd']),
        ('rsd', ['--self-distill', 'rsd']),
        ('kd', teacher),
        ('sfd-ri', teacher + ['--sfd', 'ri']),
    ])
    for s in SCALES[1:]:
        configs[scaled_name('tffd-inter+intra', s)] = ['--tffd', 'inter,intra'] + _tffd_weights(s)
    if scale != 1:
        configs[scaled_name('tffd+label-smoothing', scale)] = \
            ['--tffd', 'inter,intra', '--smoothing', '0.1'] + _tffd_weights(scale)
    return configs


def table_names(scale: float) -> List[str]:
    """The table's configurations in run order (the baseline and the controls come from the control phase)."""
    names = []
    for n in TABLE_ORDER:
        if n.endswith('-xS'):
            if scale == 1:
                continue
            n = scaled_name(n[:-3], scale)
        names.append(n)
    return names


# ----------------------------------------------------------------------------------------------------- data


def _read_idx(path: str, labels: bool) -> np.ndarray:
    with open(path, 'rb') as f:
        data = f.read()
    if labels:
        return np.frombuffer(data, np.uint8, offset=8)
    n, rows, cols = (int.from_bytes(data[i:i + 4], 'big') for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def split_indices(n_pool: int, n_train: int, n_val: int, seed: int = 0, n_wide: int = 0) -> Dict[str, List[int]]:
    """Disjoint training subset and validation split of the training images ``range(n_pool)``, drawn once with a
    fixed seed (the same for every training seed); with ``n_wide``, also ``validation-wide``: the next ``n_wide``
    images of the same draw (the first two splits do not depend on it)."""
    if n_train + n_val + n_wide > n_pool:
        raise ValueError(f'{n_train} + {n_val} + {n_wide} images requested from a pool of {n_pool}')
    order = np.random.default_rng(seed).permutation(n_pool)
    out = {'train': sorted(order[:n_train].tolist()), 'validation': sorted(order[n_train:n_train + n_val].tolist())}
    if n_wide:
        out['validation-wide'] = sorted(order[n_train + n_val:n_train + n_val + n_wide].tolist())
    return out


def _write_split(root: str, split: str, indices: Sequence[int], x: np.ndarray, y: np.ndarray) -> None:
    """``root/split/<class>/<index>.png``, written to a temporary folder first and renamed into place."""
    import shutil
    from PIL import Image
    tmp = os.path.join(root, split + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    for i in indices:
        folder = os.path.join(tmp, str(int(y[i])))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(x[i]).save(os.path.join(folder, f'{i:05d}.png'))
    shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    os.replace(tmp, os.path.join(root, split))


def prepare_testbed(src: str, root: str, n_train: int, n_val: int, n_test: int = 0, seed: int = 0) -> str:
    """Write the testbed as ImageFolder splits ``root/{train,validation,test}/<class>/<index>.png`` (the index into
    its IDX file) and ``root/manifest.json`` with the indices; reused when the manifest matches. ``n_test`` 0: the
    whole official test set. Returns ``root``."""
    spec = dict(source=os.path.abspath(src), n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    manifest_path = os.path.join(root, 'manifest.json')
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get('spec') == spec:
            return root
    raw = os.path.join(prepare_fashion_mnist(src, os.path.join(root, 'idx')), 'FashionMNIST', 'raw')
    train_x, train_y = _read_idx(os.path.join(raw, 'train-images-idx3-ubyte'), False), \
        _read_idx(os.path.join(raw, 'train-labels-idx1-ubyte'), True)
    test_x, test_y = _read_idx(os.path.join(raw, 't10k-images-idx3-ubyte'), False), \
        _read_idx(os.path.join(raw, 't10k-labels-idx1-ubyte'), True)
    splits = split_indices(len(train_x), n_train, n_val, seed)
    splits['test'] = list(range(len(test_x) if not n_test else min(n_test, len(test_x))))
    for split, indices in splits.items():
        x, y = (test_x, test_y) if split == 'test' else (train_x, train_y)
        _write_split(root, split, indices, x, y)
    with open(manifest_path, 'w') as f:
        json.dump({'spec': spec, **splits}, f)
    return root


def prepare_wide_validation(src: str, root: str, n_train: int, n_val: int, n_wide: int, seed: int = 0) -> str:
    """Write ``root/validation-wide``: ``n_wide`` more training images of the testbed's draw, disjoint from its
    training subset, its validation split and the test set (``split_indices``), with ``root/wide_manifest.json``;
    reused when the manifest matches. Returns ``root``."""
    spec = dict(source=os.path.abspath(src), n_train=n_train, n_val=n_val, n_wide=n_wide, seed=seed)
    manifest_path = os.path.join(root, 'wide_manifest.json')
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if json.load(f).get('spec') == spec:
                return root
    raw = os.path.join(prepare_fashion_mnist(src, os.path.join(root, 'idx')), 'FashionMNIST', 'raw')
    train_x, train_y = _read_idx(os.path.join(raw, 'train-images-idx3-ubyte'), False), \
        _read_idx(os.path.join(raw, 'train-labels-idx1-ubyte'), True)
    indices = split_indices(len(train_x), n_train, n_val, seed, n_wide)['validation-wide']
    _write_split(root, 'validation-wide', indices, train_x, train_y)
    with open(manifest_path, 'w') as f:
        json.dump({'spec': spec, 'validation-wide': indices}, f)
    return root


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(checkpoint: str, model_name: str, data_root: str, splits: Sequence[str], batch_size: int = 500) -> dict:
    """Top-1 of a training checkpoint on ImageFolder splits, with the training script's evaluation transform (timm's
    ``resolve_data_config`` / ``create_transform`` from the same arguments). Weights are read with
    ``weights_only=True``."""
    import timm
    import torch
    from timm.data import create_dataset, create_transform, resolve_data_config

    from timm_tffd.hub.run import load_state_dict  # importing timm_tffd registers the CIFAR zoo
    model = timm.create_model(model_name, in_chans=1, num_classes=10)
    model.load_state_dict(load_state_dict(checkpoint, use_ema=False))
    model.eval()
    config = resolve_data_config({'img_size': 28, 'in_chans': 1, 'mean': (MEAN,), 'std': (STD,)}, model=model)
    transform = create_transform(**config, is_training=False)
    out = {}
    for split in splits:
        dataset = create_dataset('', root=data_root, split=split, is_training=False, input_img_mode='L')
        dataset.transform = transform
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        out[split] = 100. * correct / total
    return out


# ------------------------------------------------------------------------------------------------ statistics


def loss_share(row: dict) -> Optional[float]:
    """The weighted extra terms' share of one epoch's training loss, ``1 - base / total``; None for a run that logs
    no base loss (label smoothing, DropBlock, SD, RSD act inside the loss or the weights: no separate term)."""
    base = row.get('train_base_loss', row.get('train_task_loss'))
    if base is None or row.get('train_loss') in (None, 0):
        return None
    return 1. - base / row['train_loss']


def choose(values: Dict[float, Sequence[float]]) -> float:
    """The candidate with the highest mean (the first of equal means)."""
    return max(values, key=lambda k: statistics.fmean(values[k]))


def bonferroni_level(m: int, alpha: float = 0.05) -> float:
    return 1. - alpha / max(1, m)


# -------------------------------------------------------------------------------------------------- the runs


class Stage:
    def __init__(self, args):
        self.args = args
        self.mode = MODES[args.mode]
        self.records_dir = os.path.join(args.out, 'regularization_runs' + ('' if args.mode == 'testbed'
                                                                           else f'_{args.mode}'))
        self.stem = 'regularization' + ('' if args.mode == 'testbed' else f'_{args.mode}')
        self.ran = 0
        self.failed: List[str] = []
        self.stopped: Optional[str] = None
        self.plan: List[str] = []  # every run key of the plan known so far, in order

    # records --------------------------------------------------------------------------------------------------
    def key(self, config: str, seed: int, lr: float) -> str:
        return f'lr{lr:g}/{config}-seed{seed}'

    def record_path(self, key: str) -> str:
        return os.path.join(self.records_dir, key + '.json')

    def record(self, config: str, seed: int, lr: float) -> Optional[dict]:
        return self._load(self.key(config, seed, lr))

    def _load(self, key: str) -> Optional[dict]:
        path = self.record_path(key)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def records(self, config: str, seeds: Sequence[int], lr: float) -> List[dict]:
        return [r for r in (self.record(config, s, lr) for s in seeds) if r is not None]

    # training -------------------------------------------------------------------------------------------------
    def _deadline_passed(self) -> bool:
        if not self.args.no_start_after:
            return False
        hh, mm = map(int, self.args.no_start_after.split(':'))
        now = datetime.datetime.now(datetime.timezone.utc)
        return (now.hour, now.minute) >= (hh, mm)

    def ensure(self, config: str, seed: int, lr: float, extra: Optional[List[str]] = None) -> Optional[dict]:
        """The run's record, training it first when it is missing (None when it could not run: deadline, failure)."""
        key = self.key(config, seed, lr)
        if key not in self.plan:
            self.plan.append(key)
        rec = self.record(config, seed, lr)
        if rec is not None or self.args.report_only:
            return rec
        if self.stopped:
            return None
        if self._deadline_passed():
            self.stopped = f'no new run after {self.args.no_start_after} UTC'
            print(f'stopping: {self.stopped}', flush=True)
            return None
        model = TEACHER if config == 'teacher' else STUDENT
        extra = list(configurations(self.args.scale_for_configs)[config] if extra is None else extra)
        teacher_key = None
        if 'TEACHER' in extra:
            teacher = self.ensure('teacher', seed, lr, [])
            if teacher is None:
                return None
            ckpt = os.path.join(self.run_dir(self.key('teacher', seed, lr)), 'last.pth.tar')
            if not os.path.exists(ckpt):  # the record came from an earlier sitting; its checkpoint is gone: retrain
                os.remove(self.record_path(self.key('teacher', seed, lr)))
                teacher = self.ensure('teacher', seed, lr, [])
                if teacher is None:
                    return None
            extra = [ckpt if a == 'TEACHER' else a for a in extra]
            teacher_key = self.key('teacher', seed, lr)
        for attempt in range(self.args.retries + 1):
            try:
                return self._train(key, config, seed, lr, extra, model, teacher_key)
            except SystemExit as e:  # the script failed (e.g. mid-edit): wait and retry, then move on
                print(f'{key} failed (attempt {attempt + 1}): {str(e)[-1500:]}', flush=True)
                if attempt < self.args.retries:
                    time.sleep(self.args.retry_wait)
        self.failed.append(key)
        return None

    def run_dir(self, key: str) -> str:
        return os.path.join(self.args.runs, key.replace('/', '-'))

    def _train(self, key, config, seed, lr, extra, model, teacher_key) -> dict:
        args = self.args
        run_args = argparse.Namespace(
            runs=args.runs, data_args=args.data_args, lr=lr, batch_size=self.mode['batch'], workers=0,
            mode='testbed', threads=args.threads, tffd_warmup=0)
        name = key.replace('/', '-')[:-len(f'-seed{seed}')]
        budget = {'train_samples': 0}
        print(f'{key}: training ({datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} UTC)', flush=True)
        run_dir, seconds = run_training(name, extra, seed, run_args, budget, self.mode['epochs'], model)
        t0 = time.perf_counter()
        top1 = evaluate(os.path.join(run_dir, 'last.pth.tar'), model, args.data_root, ('train', 'validation', 'test'))
        eval_s = time.perf_counter() - t0
        with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
            epochs = [{k: float(v) for k, v in row.items() if v not in ('', None)} for row in csv.DictReader(f)]
        if len(epochs) != self.mode['epochs']:
            raise SystemExit(f'{key}: {len(epochs)} epochs in summary.csv, {self.mode["epochs"]} expected')
        rec = dict(
            key=key, config=config, seed=seed, lr=lr, model=model, extra=extra, epochs=epochs,
            val_top1=epochs[-1]['eval_top1'], val_top1_reevaluated=top1['validation'], test_top1=top1['test'],
            train_top1=top1['train'], train_loss=epochs[-1]['train_loss'], wall_s=seconds, eval_s=eval_s,
            teacher=teacher_key, testbed=dict(self.mode, lrs=list(self.mode['lrs']), scales=list(self.mode['scales'])),
            code_commit=_git_head(), finished_utc=f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}')
        if abs(rec['val_top1'] - rec['val_top1_reevaluated']) > 0.05:
            print(f'warning: {key}: validation top-1 {rec["val_top1"]:.2f} in the run, '
                  f'{rec["val_top1_reevaluated"]:.2f} re-evaluated from the checkpoint', flush=True)
        path = self.record_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            json.dump(rec, f, indent=1)
        os.replace(path + '.tmp', path)
        self.ran += 1
        print(f'{key}: val {rec["val_top1"]:.2f}  test {rec["test_top1"]:.2f}  train top-1 {rec["train_top1"]:.2f}  '
              f'train loss {rec["train_loss"]:.4f}  ({seconds:.0f} s + {eval_s:.0f} s evaluation)', flush=True)
        return rec

    # the decisions on the wide validation split --------------------------------------------------------------
    def decision_keys(self) -> List[str]:
        """The runs every choice is made from: the learning-rate sweep, the positive control and the scale sweep."""
        mode, keys = self.mode, []
        if not self.args.lr:
            keys += [self.key('baseline', s, lr) for lr in mode['lrs'] for s in range(mode['tune_seeds'])]
        lr = self.lr_summary()['lr']
        if lr is not None:
            keys += [self.key(c, s, lr) for c in ['baseline'] + [c for c in CONTROLS if self.selected(c)]
                     for s in range(mode['seeds'])]
            if not self.args.tffd_scale:
                keys += [self.key(scaled_name('tffd-inter+intra', sc), s, lr) for sc in mode['scales']
                         for s in range(mode['scale_seeds'])]
        return list(dict.fromkeys(keys))

    def evaluate_wide(self) -> Dict[str, int]:
        """Adds ``val_wide_top1`` (top-1 on the wide validation split) to each finished decision run's record, from
        its final checkpoint (evaluation only; a record whose checkpoint is gone is left as it is)."""
        counts = {'evaluated': 0, 'had': 0, 'no_checkpoint': 0, 'not_finished': 0}
        for key in self.decision_keys():
            path = self.record_path(key)
            if not os.path.exists(path):
                counts['not_finished'] += 1
                continue
            with open(path) as f:
                rec = json.load(f)
            if 'val_wide_top1' in rec:
                counts['had'] += 1
                continue
            ckpt = os.path.join(self.run_dir(key), 'last.pth.tar')
            if not os.path.exists(ckpt):
                counts['no_checkpoint'] += 1
                continue
            rec['val_wide_top1'] = evaluate(ckpt, rec['model'], self.args.data_root, ('validation-wide',))[
                'validation-wide']
            with open(path + '.tmp', 'w') as f:
                json.dump(rec, f, indent=1)
            os.replace(path + '.tmp', path)
            counts['evaluated'] += 1
            print(f'{key}: wide validation top-1 {rec["val_wide_top1"]:.2f}', flush=True)
        return counts

    def wide_summary(self) -> Optional[dict]:
        """The three decisions again, read from the wide validation split (None when no run has it)."""
        keys = self.decision_keys()
        have = [k for k in keys if 'val_wide_top1' in (self._load(k) or {})]
        if not have:
            return None
        lr_state = self.lr_summary('val_wide_top1')
        lr = self.lr_summary()['lr']  # the decisions stay those of the validation split; this checks them
        return {'images': self.mode['wide_val'], 'runs': len(keys), 'evaluated': len(have), 'lr': lr_state,
                'positive_control': self.control_summary(lr, 'val_wide_top1') if lr is not None else None,
                'tffd_scale': self.scale_summary(lr, 'val_wide_top1') if lr is not None else None}

    # phases ---------------------------------------------------------------------------------------------------
    def selected(self, name: str) -> bool:
        return name == 'baseline' or not self.args.configs or name in self.args.configs

    def lr_summary(self, metric: str = 'val_top1') -> dict:
        """The learning-rate phase's choice from the finished records; ``metric``: the validation top-1 it reads
        (``val_wide_top1``: the same runs on the wide validation split)."""
        seeds = range(self.mode['tune_seeds'])
        if self.args.lr:
            return {'lr': self.args.lr, 'how': 'given (--lr)', 'values': {}}
        runs = {lr: [r for r in self.records('baseline', seeds, lr) if metric in r] for lr in self.mode['lrs']}
        detail = {f'{lr:g}': dict(val_top1=[r[metric] for r in runs[lr]],
                                  train_loss=[r['train_loss'] for r in runs[lr]],
                                  train_top1=[r['train_top1'] for r in runs[lr]]) for lr in self.mode['lrs']}
        if any(len(v) < len(seeds) for v in runs.values()):
            return {'lr': None, 'how': 'not all learning rates finished', 'values': detail}
        chosen = choose({lr: [r[metric] for r in runs[lr]] for lr in self.mode['lrs']})
        return {'lr': chosen, 'how': f'highest mean final validation top-1 over seeds {list(seeds)}', 'values': detail}

    def control_summary(self, lr: float, metric: str = 'val_top1') -> dict:
        seeds = list(range(self.mode['seeds']))
        names = [c for c in CONTROLS if self.selected(c)]
        out = {'seeds': seeds, 'configs': {}, 'holds': None}
        for name in names:
            common = [s for s in seeds if metric in (self.record(name, s, lr) or {})
                      and metric in (self.record('baseline', s, lr) or {})]
            if not common:
                continue
            g = paired_gain([self.record(name, s, lr)[metric] for s in common],
                            [self.record('baseline', s, lr)[metric] for s in common])
            out['configs'][name] = dict(n=len(common), **g)
        if len(out['configs']) == len(names) and all(v['n'] == len(seeds) for v in out['configs'].values()):
            out['holds'] = any(v['ci_low'] > 0 for v in out['configs'].values())
        return out

    def scale_summary(self, lr: float, metric: str = 'val_top1') -> dict:
        if self.args.tffd_scale:
            return {'scale': self.args.tffd_scale, 'how': 'given (--tffd-scale)', 'values': {}}
        seeds = range(self.mode['scale_seeds'])
        names = [scaled_name('tffd-inter+intra', s) for s in self.mode['scales']]
        if not any(self.selected(n) for n in names):
            return {'scale': 1, 'how': 'not validated (no Tf-FD configuration selected)', 'values': {}}
        runs = {sc: [r for r in self.records(n, seeds, lr) if metric in r]
                for sc, n in zip(self.mode['scales'], names)}
        base = [r[metric] for r in self.records('baseline', seeds, lr) if metric in r]
        detail = {f'x{sc:g}': dict(val_top1=[r[metric] for r in v], baseline_val_top1=base)
                  for sc, v in runs.items()}
        if any(len(v) < len(seeds) for v in runs.values()):
            return {'scale': None, 'how': 'not all scales finished', 'values': detail}
        chosen = choose({sc: [r[metric] for r in v] for sc, v in runs.items()})
        return {'scale': chosen, 'how': f'highest mean final validation top-1 over seeds {list(seeds)}',
                'values': detail}

    def _ensure_all(self, names: Sequence[str], seeds: Sequence[int], lr: float) -> None:
        """One configuration after the other, every seed; the report is rewritten after each trained run."""
        for name in names:
            for s in seeds:
                before = self.ran
                self.ensure(name, s, lr)
                if self.ran > before:
                    try:
                        self.report()
                    except Exception as e:  # a report bug must not stop the runs; the records are what matters
                        print(f'warning: report not written: {type(e).__name__}: {e}', flush=True)

    def run(self) -> dict:
        """The phases in order; each choice is read back from the finished records."""
        mode = self.mode
        self.args.scale_for_configs = self.args.tffd_scale or 1
        if not self.args.lr:
            for lr in mode['lrs']:
                self._ensure_all(['baseline'], range(mode['tune_seeds']), lr)
        lr = self.lr_summary()['lr']
        if lr is None:
            return self.report()
        self._ensure_all(['baseline'] + [c for c in CONTROLS if self.selected(c)], range(mode['seeds']), lr)
        if not self.args.tffd_scale:
            names = [scaled_name('tffd-inter+intra', s) for s in mode['scales']]
            self._ensure_all([n for n in names if self.selected(n)], range(mode['scale_seeds']), lr)
        scale = self.scale_summary(lr)['scale']
        if scale is None:
            return self.report()
        self.args.scale_for_configs = scale
        self._ensure_all([n for n in table_names(scale) if self.selected(n)], range(mode['seeds']), lr)
        return self.report()

    # report ---------------------------------------------------------------------------------------------------
    # report ---------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        return write_regularization_report(self)


def _git_head() -> Optional[str]:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------------------------- report


def _fmt_gain(g: dict) -> str:
    if g is None or math.isnan(g.get('ci_low', math.nan)):
        return '—' if g is None else f'{g["gain"]:+.2f}'
    return f'{g["gain"]:+.2f} [{g["ci_low"]:+.2f}, {g["ci_high"]:+.2f}]'


def share_curve(records: List[dict]) -> Optional[List[float]]:
    """Per-epoch extra terms' share of the training loss, mean over runs (None without separate terms)."""
    curves = [[loss_share(e) for e in r['epochs']] for r in records]
    if not curves or any(v is None for c in curves for v in c):
        return None
    return [statistics.fmean(v) for v in zip(*curves)]


def compared_names(stage: Stage, scale: float) -> List[str]:
    """The configurations the table compares with the baseline: the controls, the table's rows and the scales of the
    validation sweep that were not chosen (their runs are reported too)."""
    names = list(CONTROLS) + table_names(scale)
    if not stage.args.tffd_scale:
        names += [n for n in (scaled_name('tffd-inter+intra', s) for s in stage.mode['scales']) if n not in names]
    return [n for n in names if stage.selected(n)]


def table_rows(stage: Stage, lr: float, scale: float) -> 'OrderedDict[str, dict]':
    seeds = list(range(stage.mode['seeds']))
    names = ['baseline'] + compared_names(stage, scale)
    base = {s: stage.record('baseline', s, lr) for s in seeds}
    teachers = {s: stage.record('teacher', s, lr) for s in seeds}
    rows = OrderedDict()
    for name in names:
        recs = {s: stage.record(name, s, lr) for s in seeds}
        done = [s for s in seeds if recs[s] is not None]
        if not done:
            continue
        runs = [recs[s] for s in done]
        test = [r['test_top1'] for r in runs]
        row = dict(seeds=done, test_top1=test, val_top1=[r['val_top1'] for r in runs],
                   train_loss=[r['train_loss'] for r in runs], train_top1=[r['train_top1'] for r in runs],
                   time_s=statistics.median(r['wall_s'] for r in runs), **summarize(test))
        uses_teacher = any(r.get('teacher') for r in runs)
        tt = [teachers[s]['wall_s'] for s in done if teachers[s]] if uses_teacher else []
        row['teacher_s'] = statistics.median(tt) if tt else 0.
        row['loss_share_per_epoch'] = share_curve(runs)
        common = [s for s in done if base[s] is not None]
        if name != 'baseline' and len(common) >= 1:
            row.update(paired_gain([recs[s]['test_top1'] for s in common], [base[s]['test_top1'] for s in common]))
            row['paired_seeds'] = common
            row['val_gain'] = paired_gain([recs[s]['val_top1'] for s in common],
                                          [base[s]['val_top1'] for s in common])
        elif name == 'baseline':
            row.update(gain=0., ci_low=0., ci_high=0.)
        rows[name] = row
    # multiple comparisons: Bonferroni over the rows compared with the baseline at full seeds
    full = [n for n, r in rows.items() if n != 'baseline' and r['n'] == len(seeds) and len(r.get('paired_seeds', []))
            == len(seeds)]
    m = len(names) - 1
    for n in full:
        recs = [stage.record(n, s, lr)['test_top1'] for s in seeds]
        b = paired_gain(recs, [base[s]['test_top1'] for s in seeds], confidence=bonferroni_level(m))
        rows[n]['bonferroni'] = {'ci_low': b['ci_low'], 'ci_high': b['ci_high'], 'level': bonferroni_level(m)}
    return rows


def _share_text(curve: Optional[List[float]]) -> str:
    if curve is None:
        return '—'
    n = len(curve)
    picks = sorted({0, n // 3, 2 * n // 3, n - 1})
    return ' / '.join(f'{100 * curve[i]:.0f}' for i in picks) + f' (mean {100 * statistics.fmean(curve):.0f})'


def _share_epochs(n: int) -> str:
    return ' / '.join(str(i + 1) for i in sorted({0, n // 3, 2 * n // 3, n - 1}))


def plan_keys(stage: Stage, lr: Optional[float], scale: Optional[float]) -> List[str]:
    """Every run of the whole plan (as far as the choices made so far define it)."""
    mode = stage.mode
    keys = []
    if not stage.args.lr:
        keys += [stage.key('baseline', s, r) for r in mode['lrs'] for s in range(mode['tune_seeds'])]
    if lr is None:
        return keys
    seeds = range(mode['seeds'])
    keys += [stage.key(n, s, lr) for n in ['baseline'] + [c for c in CONTROLS if stage.selected(c)] for s in seeds]
    if not stage.args.tffd_scale:
        keys += [stage.key(scaled_name('tffd-inter+intra', sc), s, lr) for sc in mode['scales']
                 for s in range(mode['scale_seeds']) if stage.selected(scaled_name('tffd-inter+intra', sc))]
    names = table_names(scale if scale else 1)
    if scale is None:  # the scaled rows are not known yet: count them as two configurations
        names += ['tffd-inter+intra-xS', 'tffd+label-smoothing-xS']
    for n in names:
        if stage.selected(n):
            if n in ('kd', 'sfd-ri'):
                keys += [stage.key('teacher', s, lr) for s in seeds]
            keys += [stage.key(n, s, lr) for s in seeds]
    return list(OrderedDict.fromkeys(keys))


def write_regularization_report(stage: Stage) -> dict:
    args, mode = stage.args, stage.mode
    lr_state = stage.lr_summary()
    lr = lr_state['lr']
    control = stage.control_summary(lr) if lr is not None else None
    scale_state = stage.scale_summary(lr) if lr is not None else None
    scale = scale_state['scale'] if scale_state else None
    # before the learning rate is chosen, the plan is counted with the middle candidate in its place
    keys = plan_keys(stage, lr if lr is not None else stage.mode['lrs'][len(stage.mode['lrs']) // 2], scale)
    done_keys = [k for k in keys if os.path.exists(stage.record_path(k))]
    all_records = []
    for root, _, files in os.walk(stage.records_dir):
        for f in files:
            if f.endswith('.json'):
                with open(os.path.join(root, f)) as fh:
                    all_records.append(json.load(fh))
    student_s = [r['wall_s'] for r in all_records if r['model'] == STUDENT]
    teacher_s = [r['wall_s'] for r in all_records if r['model'] == TEACHER]
    per_run = statistics.median(student_s) if student_s else math.nan
    per_teacher = statistics.median(teacher_s) if teacher_s else 3 * per_run
    remaining = [k for k in keys if k not in done_keys]
    remaining_s = sum(per_teacher if '/teacher-' in k else per_run for k in remaining)
    rows = table_rows(stage, lr, scale or 1) if lr is not None else OrderedDict()
    result = {
        'mode': args.mode, 'testbed': dict(mode, lrs=list(mode['lrs']), scales=list(mode['scales'])),
        'seeds': list(range(mode['seeds'])), 'student': STUDENT, 'teacher': TEACHER,
        'lr': lr_state, 'positive_control': control, 'tffd_scale': scale_state, 'configs': rows,
        'plan': {'runs': len(keys), 'finished': len(done_keys), 'remaining': remaining,
                 'remaining_s_estimate': remaining_s, 'student_run_s': per_run,
                 'teacher_run_s': per_teacher if teacher_s else None},
        'stopped': stage.stopped, 'failed': stage.failed, 'resume_command': args.resume_command,
        'wide_validation': stage.wide_summary(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'{stage.stem}.json.tmp'), 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(args.out, f'{stage.stem}.json.tmp'), os.path.join(args.out, f'{stage.stem}.json'))
    md = _markdown(stage, result, lr, scale)
    with open(os.path.join(args.out, f'{stage.stem}.md'), 'w') as f:
        f.write(md)
    if not args.no_plots:
        _plots(stage, result, lr)
    return result


def _markdown(stage: Stage, result: dict, lr, scale) -> str:
    mode = stage.mode
    plan = result['plan']
    n_test = mode['test'] or 10000
    lines = [
        '# Regularization testbed: Fashion-MNIST, over-fitting regime', '',
        f'**Status: {plan["finished"]} of {plan["runs"]} runs of the plan finished'
        + (f'; remaining about {plan["remaining_s_estimate"] / 3600:.1f} h at one thread'
           if plan['remaining'] else '; complete') + '.** '
        + (f'Stopped: {result["stopped"]}. ' if result['stopped'] else '')
        + (f'Failed: {", ".join(result["failed"])}. ' if result['failed'] else '')
        + f'Resume with `{result["resume_command"]}` (finished runs are reused).', '',
        '## Testbed', '',
        f'{STUDENT} (0.08M parameters) on a fixed subset of {mode["train"]} Fashion-MNIST training images (drawn '
        f'once, seed 0, the same for every training seed), {mode["epochs"]} epochs, SGD momentum 0.9, cosine schedule '
        f'without warm-up, batch {mode["batch"]}, weight decay 5e-4, no augmentation, `--smoothing 0`, the Tf-FD '
        f'warm-up off (`--tffd-warmup-epochs 0`). '
        f'Validation split: {mode["val"]} other training images (disjoint from the subset), evaluated every epoch by '
        f'the training script; every choice below is made on it. Test: the official test set ({n_test} images), '
        f'evaluated once per run from its final checkpoint and read only by the final table. One run at a time, one '
        f'thread (`OMP_NUM_THREADS=1`). Measured time per {STUDENT} run (median over the '
        f'finished runs, training only; the test evaluation adds about 10 s): {plan["student_run_s"]:.0f} s'
        + (f'; per {TEACHER} teacher run: {plan["teacher_run_s"]:.0f} s' if plan['teacher_run_s'] else '') + '.',
        '',
        'No augmentation: the pad-4 crop + flip of the CIFAR recipes is itself a strong regularizer and would shrink '
        'the over-fitting the regularizers under test are meant to correct; without it the baseline fits its training '
        'subset completely within the budget (below), which is the regime this testbed is for.', '',
    ] + _overfit_text(stage, lr)
    lr_state = result['lr']
    if lr_state:
        lines += ['## 1. Baseline learning rate (validation)', '',
                  f'Chosen: **{lr_state["lr"]}** ({lr_state["how"]}).', '',
                  '| lr | val top-1 per seed | mean | final train loss | final train top-1 |',
                  '|---|---|---:|---:|---:|']
        for k, v in lr_state['values'].items():
            if v['val_top1']:
                lines.append(f'| {k} | {" / ".join(f"{x:.2f}" for x in v["val_top1"])} | '
                             f'{statistics.fmean(v["val_top1"]):.2f} | '
                             f'{" / ".join(f"{x:.4f}" for x in v["train_loss"])} | '
                             f'{" / ".join(f"{x:.2f}" for x in v["train_top1"])} |')
        lines.append('')
    control = result['positive_control']
    if control:
        verdict = {True: '**holds**', False: '**does not hold**', None: 'not decided yet (runs missing)'}[
            control['holds']]
        lines += ['## 2. Positive control (validation)', '',
                  f'Label smoothing 0.1 and DropBlock 0.1 against the baseline, seeds {control["seeds"]}, gain in '
                  f'final validation top-1 with the paired 95% interval. The control {verdict}: it holds when one '
                  'interval lies above 0.', '',
                  '| control | n | val gain [95% CI] |', '|---|---:|---:|']
        for k, v in control['configs'].items():
            lines.append(f'| {k} | {v["n"]} | {_fmt_gain(v)} |')
        lines.append('')
    scale_state = result['tffd_scale']
    if scale_state:
        lines += ['## 3. Tf-FD weight scale (validation)', '',
                  f'Chosen: **x{scale_state["scale"]}** ({scale_state["how"]}).' if scale_state['scale'] else
                  f'Not chosen yet ({scale_state["how"]}).', '',
                  '| inter+intra weights | val top-1 per seed | mean | baseline mean (same seeds) |',
                  '|---|---|---:|---:|']
        for k, v in scale_state['values'].items():
            if v['val_top1']:
                b = v['baseline_val_top1']
                lines.append(f'| {k} | {" / ".join(f"{x:.2f}" for x in v["val_top1"])} | '
                             f'{statistics.fmean(v["val_top1"]):.2f} | {statistics.fmean(b):.2f} |')
        lines.append('')
    lines += _wide_text(result.get('wide_validation'), result)
    rows = result['configs']
    if rows:
        m = len(compared_names(stage, scale or 1))
        n_seeds = mode['seeds']
        lines += [
            '## 4. Every method (test set)', '',
            f'Seeds {result["seeds"]}, lr {lr}, test top-1 of the final epoch. *gain*: paired 95% t interval over the '
            f'seeds finished for both the row and the baseline; *Bonferroni*: the same at level 1 - 0.05/{m} (the '
            f'table compares {m} configurations with the baseline, so about {0.05 * m:.1f} of the plain 95% intervals '
            f'would exclude 0 by chance if nothing worked), only for rows at all {n_seeds} seeds. *val gain*: the same '
            f'on the validation split. *terms / loss*: the weighted extra terms\' share of the training loss, in %, at '
            f'epochs {_share_epochs(mode["epochs"])} (mean over epochs), mean over seeds; "—" for methods that add no '
            f'separate term. *wall*: one run at one thread, median over seeds (the machine is shared, '
            f'so single runs can take longer); *+ teacher*: the median of the seeds\' teacher trainings.', '',
            '| configuration | n | test top-1 mean | std | gain [95% CI] | Bonferroni CI | val gain [95% CI] '
            '| train loss | train top-1 | terms / loss (%) | wall (s) | + teacher (s) |',
            '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|']
        for name, r in rows.items():
            gain = '—' if name == 'baseline' else _fmt_gain(r if 'gain' in r else None)
            bon = r.get('bonferroni')
            bon = f'[{bon["ci_low"]:+.2f}, {bon["ci_high"]:+.2f}]' if bon else '—'
            val = '—' if name == 'baseline' else _fmt_gain(r.get('val_gain'))
            std = f'{r["std"]:.2f}' if not math.isnan(r['std']) else '—'
            teacher = f'{r["teacher_s"]:.0f}' if r['teacher_s'] else '—'
            lines.append(
                f'| {name} | {r["n"]} | {r["mean"]:.2f} | {std} | {gain} | {bon} | {val} | '
                f'{statistics.fmean(r["train_loss"]):.4f} | {statistics.fmean(r["train_top1"]):.2f} | '
                f'{_share_text(r["loss_share_per_epoch"])} | {r["time_s"]:.0f} | {teacher} |')
        teachers = stage.records('teacher', range(n_seeds), lr)
        if teachers:
            lines += ['', f'Teachers ({TEACHER}, same subset and recipe, one per seed): test top-1 '
                      + ' / '.join(f'{t["test_top1"]:.2f}' for t in teachers)
                      + f', {statistics.median(t["wall_s"] for t in teachers):.0f} s a run.']
        lines.append('')
    if result['plan']['remaining']:
        rem = result['plan']['remaining']
        lines += ['## Remaining runs', '', f'{len(rem)} runs: ' + ', '.join(f'`{k}`' for k in rem[:60])
                  + (' ...' if len(rem) > 60 else ''), '']
    lines += ['## Figures', '', f'![curves]({stage.stem}_curves.png)',
              f'![gain against cost]({stage.stem}_gain_vs_cost.png)',
              '', 'Curves: validation top-1, training loss (log scale) and the extra terms\' share '
              'of the training loss per epoch, mean over seeds with the min-max spread shaded. Test top-1 is measured '
              'once, at the end of each run (the table), not per epoch.', '']
    return '\n'.join(lines)


def _wide_text(wide: Optional[dict], result: dict) -> List[str]:
    """The markdown section of the decisions read again from the wide validation split."""
    if not wide:
        return []
    lines = ['## 3b. The same decisions on a wider validation split (evaluation only)', '',
             f'The {wide["images"]:,}-image validation split is {wide["images"]:,} more training images of the same '
             f'draw, disjoint from the training subset, the validation split and the test set; the final checkpoint '
             f'of each run behind the decisions above is evaluated on it ({wide["evaluated"]} of {wide["runs"]} runs; '
             f'`--wide-validation`). The decisions stay those of the validation split above; this only checks them '
             f'with about ten times the images.', '']
    lr_state = wide['lr']
    if lr_state.get('values'):
        means = {k: statistics.fmean(v['val_top1']) for k, v in lr_state['values'].items() if v['val_top1']}
        lines.append('- Learning rate: mean wide-validation top-1 '
                     + ', '.join(f'{k}: {v:.2f}' for k, v in means.items())
                     + (f'; would choose **{lr_state["lr"]}** (chosen: {result["lr"]["lr"]}).' if lr_state['lr']
                        else '.'))
    control = wide['positive_control']
    if control and control['configs']:
        verdict = {True: '**holds**', False: '**does not hold**', None: 'not decided (runs missing)'}[control['holds']]
        lines.append(f'- Positive control: {verdict} on the wide split: ' + '; '.join(
            f'{k} {_fmt_gain(v)} (n = {v["n"]})' for k, v in control['configs'].items()) + '.')
    scale_state = wide['tffd_scale']
    if scale_state and scale_state.get('values'):
        parts = [f'{k}: {statistics.fmean(v["val_top1"]):.2f}' for k, v in scale_state['values'].items()
                 if v['val_top1']]
        base = next((v['baseline_val_top1'] for v in scale_state['values'].values() if v['baseline_val_top1']), [])
        lines.append('- Tf-FD weight scale: mean wide-validation top-1 ' + ', '.join(parts)
                     + (f' (baseline, same seeds: {statistics.fmean(base):.2f})' if base else '')
                     + (f'; would choose **x{scale_state["scale"]:g}** (chosen: x{result["tffd_scale"]["scale"]:g}).'
                        if scale_state['scale'] and result['tffd_scale'] and result['tffd_scale']['scale'] else '.'))
    return lines + ['']


def _overfit_text(stage: Stage, lr) -> List[str]:
    """The over-fitting check from the baseline's records: training loss and top-1 at the end, and how much the
    validation top-1 still moves over the last sixth of the epochs."""
    if lr is None:
        return []
    recs = stage.records('baseline', range(stage.mode['seeds']), lr)
    if not recs:
        return []
    n = len(recs[0]['epochs'])
    k = max(1, n // 6)
    late = [r['epochs'][-1]['eval_top1'] - r['epochs'][-1 - k]['eval_top1'] for r in recs] if n > k else []
    best = [max(e['eval_top1'] for e in r['epochs']) - r['val_top1'] for r in recs]
    text = (f'**Over-fitting check** (baseline, lr {lr}, {len(recs)} seed(s)): final training loss '
            f'{statistics.fmean(r["train_loss"] for r in recs):.4f} (mean), training top-1 of the final model on its '
            f'training subset {statistics.fmean(r["train_top1"] for r in recs):.2f}% against a validation top-1 of '
            f'{statistics.fmean(r["val_top1"] for r in recs):.2f}%')
    if late:
        text += (f'; the validation top-1 changed by {statistics.fmean(late):+.2f} points over the last {k} epochs, '
                 f'and ends {statistics.fmean(best):.2f} points below its best epoch (mean over seeds)')
    return [text + '.', '']


def _plots(stage: Stage, result: dict, lr) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # plots need the plot extra; the tables do not
        return
    from timm_tffd.plot import _colors, _pyplot, plot_gain_vs_cost
    rows = result['configs']
    if not rows:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100)
    colors = _colors(plt, len(rows))
    for color, (name, r) in zip(colors, rows.items()):
        recs = [stage.record(name, s, lr) for s in r['seeds']]
        epochs = np.arange(1, len(recs[0]['epochs']) + 1)
        curves = [('eval_top1', axes[0]), ('train_loss', axes[1])]
        for key, ax in curves:
            v = np.array([[e[key] for e in rec['epochs']] for rec in recs])
            ax.plot(epochs, v.mean(0), color=color, label=f'{name} (n={len(recs)})')
            if len(recs) > 1:
                ax.fill_between(epochs, v.min(0), v.max(0), color=color, alpha=0.15)
        shares = [[loss_share(e) for e in rec['epochs']] for rec in recs]
        if all(x is not None for s in shares for x in s):
            v = 100 * np.array(shares)
            axes[2].plot(epochs, v.mean(0), color=color, label=name)
            if len(recs) > 1:
                axes[2].fill_between(epochs, v.min(0), v.max(0), color=color, alpha=0.15)
    axes[0].set(xlabel='epoch', ylabel='validation top-1 (%)', title='validation accuracy')
    lo = min(min(r['val_top1']) for r in rows.values())
    axes[0].set_ylim(max(0, lo - 8), None)
    axes[1].set(xlabel='epoch', ylabel='train loss', title='training loss', yscale='log')
    axes[2].set(xlabel='epoch', ylabel='extra terms / train loss (%)', title='weighted extra terms\' share')
    axes[0].legend(fontsize='x-small')
    if axes[2].lines:
        axes[2].legend(fontsize='x-small')
    fig.suptitle(f'{STUDENT}, {stage.mode["train"]} Fashion-MNIST images, {stage.mode["epochs"]} epochs, lr {lr}')
    fig.tight_layout()
    fig.savefig(os.path.join(stage.args.out, f'{stage.stem}_curves.png'))
    plt.close(fig)
    points = [dict(config=n, gain=r['gain'], ci_low=r['ci_low'], ci_high=r['ci_high'],
                   cost_s=r['time_s'] + r['teacher_s']) for n, r in rows.items()
              if n != 'baseline' and 'gain' in r and not math.isnan(r['ci_low'])]
    plot_gain_vs_cost(points, os.path.join(stage.args.out, f'{stage.stem}_gain_vs_cost.png'),
                      'test top-1 gain (paired 95% CI) against the cost of a run')


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--mode', choices=list(MODES), default='testbed')
    parser.add_argument('--configs', default='', help='comma-separated configurations to run besides the baseline '
                        '(default: all); names as in the table, e.g. label-smoothing,tffd-inter+intra')
    parser.add_argument('--lr', type=float, default=0., help='skip the learning-rate phase and use this rate')
    parser.add_argument('--tffd-scale', type=float, default=0., help='skip the scale phase and use this scale')
    parser.add_argument('--no-start-after', default='', metavar='HH:MM',
                        help='start no new training run at or after this UTC time (the report is still written)')
    parser.add_argument('--report-only', action='store_true', help='train nothing; rewrite the report')
    parser.add_argument('--retries', type=int, default=2, help='retries of a failed run (after --retry-wait s)')
    parser.add_argument('--retry-wait', type=float, default=60.)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run (OMP_NUM_THREADS)')
    parser.add_argument('--fashion-mnist', default=FASHION_MNIST, help='folder with the official .gz files')
    parser.add_argument('--data', default=os.path.join(REPO, 'benchmarks', 'runs', 'regularization-data'),
                        help='where the testbed\'s image folders are written')
    parser.add_argument('--runs', default=os.path.join(REPO, 'benchmarks', 'runs', 'regularization'),
                        help='training outputs (checkpoints; not kept in git)')
    parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results'), help='report folder')
    parser.add_argument('--no-plots', action='store_true')
    parser.add_argument('--wide-validation', action='store_true',
                        help='also evaluate the final checkpoints of the runs behind each decision on a wider '
                             'validation split (MODES[...]["wide_val"] more training images; evaluation only)')
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(',') if c]
    known = set(configurations(10)) | {scaled_name('tffd+label-smoothing', s) for s in SCALES}
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        parser.error(f'unknown configuration(s) {unknown}; choose from {", ".join(sorted(known))}')
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    kept, skip = [], False
    for a in argv_list:  # the resume command: the same selection, without this call's stop time or report-only
        if skip:
            skip = False
        elif a == '--no-start-after':
            skip = True
        elif a not in ('--report-only', '--no-plots', '--wide-validation') \
                and not a.startswith('--no-start-after='):
            kept.append(a)
    args.resume_command = ' '.join(['python benchmarks/regularization.py'] + kept)
    if args.threads:
        os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = str(args.threads)
    args.runs = os.path.join(os.path.abspath(args.runs), args.mode)
    args.out = os.path.abspath(args.out)
    mode = MODES[args.mode]
    args.data_root = prepare_testbed(args.fashion_mnist, os.path.join(os.path.abspath(args.data), args.mode),
                                     mode['train'], mode['val'], mode['test'])
    args.data_args = ['--data-dir', args.data_root, '--train-split', 'train', '--val-split', 'validation',
                      '--img-size', '28', '--mean', str(MEAN), '--std', str(STD)]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    def _terminate(signum, frame):  # the running training process is killed with the stage; it leaves no record
        raise KeyboardInterrupt(f'signal {signum}')
    signal.signal(signal.SIGTERM, _terminate)
    stage = Stage(args)
    if args.wide_validation:
        prepare_wide_validation(args.fashion_mnist, args.data_root, mode['train'], mode['val'], mode['wide_val'])
        print(f'wide validation: {stage.evaluate_wide()}', flush=True)
    try:
        result = stage.run()
    except KeyboardInterrupt:
        stage.stopped = 'interrupted'
        print('interrupted: the running training run is not recorded', flush=True)
        result = stage.report()
    result['ran'] = stage.ran
    print(f'{stage.ran} run(s) trained now; {result["plan"]["finished"]} of {result["plan"]["runs"]} runs of the plan '
          f'finished; report: {os.path.join(args.out, stage.stem + ".md")}', flush=True)
    return result


if __name__ == '__main__':
    main()

"""The model card (README.md) of a published training run: Hub metadata, details, usage, comparison, citations.

The card lists the settings the run used and no others: the Tf-FD configuration saved in the checkpoint
(``task_state['tffd']['config']``, a ``TfFDConfig``), SFD (Pei et al., IJCAI 2021) when the checkpoint holds an SFD
integrator, SD / RSD and logit KD when the run's arguments select them, and label smoothing.
"""
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch.nn as nn
import yaml

from ..config import TfFDConfig
from ..data.embedded import EMBEDDED_PATH
from .run import TrainingRun, dataset_name, in_chans, resolved_args, trained_on_embedded_data

__all__ = ['model_card', 'tffd_config', 'CITATIONS', 'TFFD_BIBTEX', 'TFD_BIBTEX', 'SFR_BIBTEX', 'SFD_BIBTEX']

# recipe keys shown when set
_RECIPE_KEYS = ('epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'img_size',
                'model_ema', 'model_ema_decay', 'amp')

TFFD_BIBTEX = """@inproceedings{li2022tffd,
  title     = {Self-Regulated Feature Learning via Teacher-free Feature Distillation},
  author    = {Li, Lujun},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022}
}"""
TFD_BIBTEX = """@inproceedings{li2022tfd,
  title     = {Teacher-free Distillation via Regularizing Intermediate Representation},
  author    = {Li, Lujun and Liang, Shiuan-Ni and Yang, Ya and Jin, Zhe},
  booktitle = {International Joint Conference on Neural Networks (IJCNN)},
  year      = {2022},
  doi       = {10.1109/IJCNN55064.2022.9892575}
}"""
SFR_BIBTEX = """@article{fan2021sfr,
  title   = {Self-Feature Regularization: Self-Feature Distillation Without Teacher Models},
  author  = {Fan, Wenxuan},
  journal = {arXiv preprint arXiv:2103.07350},
  year    = {2021}
}"""
SFD_BIBTEX = """@inproceedings{pei2021sfd,
  title     = {Self-boosting for Feature Distillation},
  author    = {Pei, Yulong and Qu, Yanyun and Zhang, Junping},
  booktitle = {International Joint Conference on Artificial Intelligence (IJCAI)},
  year      = {2021}
}"""
CITATIONS = (TFFD_BIBTEX, TFD_BIBTEX, SFR_BIBTEX, SFD_BIBTEX)

# methods from SFR (Fan, arXiv 2103.07350): EMD-l2 local matching and many-to-one channel distillation
_SFR_METHODS = ('emd', 'm2o')


def tffd_config(checkpoint: Dict[str, Any]) -> Optional[TfFDConfig]:
    """The Tf-FD settings saved in a checkpoint's ``task_state['tffd']['config']``; ``None`` for a run without Tf-FD.

    Args:
        checkpoint: The loaded training checkpoint.
    """
    state = (checkpoint.get('task_state') or {}).get('tffd')
    if state is None:
        return None
    if 'config' not in state:
        raise ValueError('the checkpoint\'s task_state["tffd"] has no "config": it was written by an older timm_tffd '
                         'and does not record the Tf-FD settings')
    try:
        return TfFDConfig.from_dict(state['config'])
    except (TypeError, ValueError) as e:
        raise ValueError(f'the Tf-FD config saved in the checkpoint cannot be read ({e}): it was written by another '
                         f'timm_tffd version, or names a method that only the training code registered') from e


def _fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}'


def _top1_top5(row: Dict[str, Any]) -> str:
    return f'{_fmt(row["eval_top1"])} / {_fmt(row["eval_top5"])}'


def _teacher(args: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher rows: its name and, for a checkpoint file, the file name (local paths are not published)."""
    out = {'teacher': args.get('kd_model_name')}
    checkpoint = args.get('teacher_checkpoint')
    if checkpoint:
        out['teacher weights'] = checkpoint if checkpoint.startswith('hf-hub:') else Path(checkpoint).name
    return out


def _tau(value: Any) -> str:
    if isinstance(value, str):
        value = value.split(',')
    if isinstance(value, (list, tuple)):
        return ' -> '.join(str(v).strip() for v in value) + (' (linear over the epochs)' if len(value) > 1 else '')
    return str(value)


def _tffd_rows(config: TfFDConfig) -> Dict[str, Any]:
    rows = {
        'methods': ', '.join(config.methods),
        'weights': ', '.join(f'{m} {w:g}' for m, w in config.weights.items()),
        'stages': 'all but a leading stem' if config.stages is None else list(config.stages),
        'preact': config.preact,
        **config.options,
        'warmup_epochs': f'{config.warmup_epochs:g}',
    }
    if config.decay is not None:
        rows['early decay'] = f'epochs {config.decay[0]:g} to {config.decay[1]:g}'
    return rows


def _recipe(args: Dict[str, Any]) -> Dict[str, Any]:
    rows = {k: args[k] for k in _RECIPE_KEYS if args.get(k) is not None and args[k] is not False}
    if not args.get('model_ema'):
        rows.pop('model_ema_decay', None)
    if args.get('smoothing'):
        rows['smoothing'] = args['smoothing']
        if args.get('smoothing_schedule') not in (None, 'constant'):
            rows['smoothing_schedule'] = args['smoothing_schedule']
            if args.get('smoothing_end') is not None:
                rows['smoothing_end'] = args['smoothing_end']
    return rows


def _training_data(args: Dict[str, Any], dataset: str) -> str:
    """What the run trained and validated on, naming the embedded subset when it was used."""
    if trained_on_embedded_data(args):
        with np.load(EMBEDDED_PATH) as data:
            n_train, n_val = len(data['train_labels']), len(data['val_labels'])
        text = (f'the Fashion-MNIST subset embedded in timm_tffd ({n_train} training / {n_val} validation images '
                f'of the official splits), not the full Fashion-MNIST')
    else:
        text = dataset
    caps = [f'{args[k]} {what} images' for k, what in (('max_train_samples', 'training'),
                                                       ('max_val_samples', 'validation')) if args.get(k)]
    return text + (f'; a random subset of {" and ".join(caps)}' if caps else '')


def _details(details: Dict[str, Any]) -> str:
    """Markdown list: one line per entry, a sub-list for a dict of settings."""
    lines = []
    for key, value in details.items():
        if isinstance(value, dict):
            lines.append(f'- **{key}:**')
            lines += [f'  - {k}: {v}' for k, v in value.items()]
        else:
            lines.append(f'- **{key}:** {value}')
    return '\n'.join(lines) + '\n'


def _usage(repo_id: str, arch: str, chans: int) -> str:
    mode = 'RGB' if chans == 3 else 'L'
    return f"""Tf-FD changes training only: this is a plain timm `{arch}`, loaded by timm alone.
```python
import timm
import torch
from PIL import Image

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
image = transform(Image.open('image.jpg').convert('{mode}')).unsqueeze(0)
with torch.inference_mode():
    probs, classes = model(image).softmax(-1).topk(5)
labels = model.pretrained_cfg['label_names']
print([(labels[c], round(p, 4)) for p, c in zip(probs[0].tolist(), classes[0].tolist())])
```
`timm_tffd.create_model('hf-hub:{repo_id}', pretrained=True)` does the same and accepts safetensors weights only.
"""


def _comparison(run: TrainingRun, baseline: TrainingRun) -> str:
    """Markdown table: the baseline run, this run, and the difference."""
    if baseline.arch != run.arch:
        raise ValueError(f'baseline {baseline.path} trains {baseline.arch}, this run {run.arch}: not comparable')
    cols = [('best', 'eval_top1'), ('best', 'eval_top5'), ('final', 'eval_top1'), ('final', 'eval_top5')]

    def values(r: TrainingRun):
        rows = {'best': r.best(), 'final': r.final()}
        return [rows[which][key] for which, key in cols]

    ours, base = values(run), values(baseline)
    lines = [
        '| Run | Tf-FD | Epochs | Top-1 (best) | Top-5 (best) | Top-1 (final) | Top-5 (final) |',
        '|---|---|---|---|---|---|---|',
        f'| baseline (`{baseline.path.name}`) | {baseline.methods()} | {len(baseline.summary)} | '
        + ' | '.join(_fmt(v) for v in base) + ' |',
        f'| this model (`{run.path.name}`) | {run.methods()} | {len(run.summary)} | '
        + ' | '.join(_fmt(v) for v in ours) + ' |',
        '| difference | | | ' + ' | '.join(f'{a - b:+.2f}' for a, b in zip(ours, base)) + ' |',
    ]
    return '\n'.join(lines) + '\n'


def _methods(run: TrainingRun, args: Dict[str, Any], checkpoint: Dict[str, Any], checkpoint_name: str):
    """The card sections of the methods the run used, a phrase for each and the papers to cite."""
    sections, used, citations = {}, [], []
    config = tffd_config(checkpoint)
    if config is None and args.get('tffd'):
        raise ValueError(f'{checkpoint_name} has no Tf-FD state (task_state["tffd"]) although the run was trained '
                         f'with --tffd {run.methods()}')
    if config is not None:
        sections['Tf-FD'] = _tffd_rows(config)
        used.append(f'Teacher-free Feature Distillation (Tf-FD: {", ".join(config.methods)})')
        citations += [TFFD_BIBTEX, TFD_BIBTEX]
    schedule = args.get('smoothing_schedule') if args.get('smoothing') else None
    if schedule not in (None, 'constant'):
        used.append(f'dynamic label smoothing ({schedule})')
    if schedule not in (None, 'constant') or (config is not None and set(config.methods) & set(_SFR_METHODS)):
        citations.append(SFR_BIBTEX)
    integrator = ((checkpoint.get('task_state') or {}).get('sfd') or {}).get('integrator')
    if integrator is not None:
        sections['SFD'] = {'integrator': integrator.upper(), 'weight': args.get('sfd_weight'), **_teacher(args)}
        used.append(f'SFD feature distillation from a {args.get("kd_model_name")} teacher')
    mode = args.get('self_distill')
    if mode:
        sections['Self-distillation'] = {'mode': mode.upper(), 'tau': _tau(args.get('sd_tau'))}
        used.append(f'self-distillation ({mode.upper()})')
    if integrator is not None or mode:
        citations.append(SFD_BIBTEX)
    if args.get('kd_model_name') and integrator is None:
        kd = {**_teacher(args), 'loss': args.get('kd_loss_type'), 'temperature': args.get('kd_temperature'),
              'distill_loss_weight': args.get('distill_loss_weight'), 'task_loss_weight': args.get('task_loss_weight')}
        sections['Logit KD'] = {k: v for k, v in kd.items() if v is not None}
        used.append(f'logit KD from a {args["kd_model_name"]} teacher')
    return sections, used, citations


def model_card(
        run: TrainingRun,
        checkpoint: Dict[str, Any],
        model: nn.Module,
        repo_id: str,
        checkpoint_name: str = 'model_best.pth.tar',
        ema: bool = False,
        dataset: Optional[str] = None,
        baseline: Optional[TrainingRun] = None,
        license: str = 'apache-2.0',
) -> str:
    """The model card (README.md text) of a run.

    Args:
        run: The training run (args.yaml and summary.csv).
        checkpoint: The published checkpoint, loaded (``args``, ``task_state``, ``epoch``).
        model: The model with the published weights.
        repo_id: ``ORG/NAME`` of the repository (for the usage snippet).
        checkpoint_name: File name of the checkpoint in the run folder.
        ema: Whether the published weights are the checkpoint's EMA weights.
        dataset: Dataset name; default from the run's arguments (``fashion_mnist`` for the embedded subset).
        baseline: A baseline run of the same model, for a comparison table.
        license: License of the weights.
    """
    args = resolved_args(run, checkpoint)
    dataset = dataset_name(args, dataset)
    best, final = run.best(), run.final()
    methods, used, citations = _methods(run, args, checkpoint, checkpoint_name)
    # timm's train.py (and the training script) validate the EMA instead of the model when it is kept on the device
    evaluated = 'EMA' if args.get('model_ema') and not args.get('model_ema_force_cpu') else 'model'
    details = {
        'Model type': 'Image classification',
        'Architecture': f'{run.arch} (plain timm: Tf-FD changes training, not the model)',
        'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        'Dataset': dataset,
        'Training data': _training_data(args, dataset),
        'Training recipe': _recipe(args),
        **methods,
    }
    details['Published weights'] = (f'{"state_dict_ema" if ema else "state_dict"} of {checkpoint_name} '
                                    f'(epoch {checkpoint.get("epoch")})')
    details['Results'] = {
        'evaluated weights (summary.csv)': evaluated,
        f'top-1 / top-5, final (epoch {int(final["epoch"])})': _top1_top5(final),
        f'top-1 / top-5, best {run.eval_metric} (epoch {int(best["epoch"])})': _top1_top5(best),
    }
    data = 'the embedded Fashion-MNIST subset' if trained_on_embedded_data(args) else dataset
    trained = f'with {" and ".join(used)}' if used else 'as a plain timm baseline (no Tf-FD)'
    description = (
        f'A {run.arch} image classifier trained on {data} with the timm_tffd library, {trained}. Final top-1 '
        f'{_fmt(final["eval_top1"])}, top-5 {_fmt(final["eval_top5"])}; best top-1 {_fmt(best["eval_top1"])}, '
        f'top-5 {_fmt(best["eval_top5"])}. License: {license}.')
    metadata = {'tags': ['image-classification', 'timm', 'tffd', 'knowledge-distillation'],
                'pipeline_tag': 'image-classification', 'library_name': 'timm', 'license': license,
                'datasets': [dataset]}
    parts = [f'---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n# Model card for {repo_id.split("/")[-1]}\n',
             description + '\n', '## Model Details\n' + _details(details),
             '## Model Usage\n' + _usage(repo_id, run.arch, in_chans(args))]
    if baseline is not None:
        parts.append('## Model Comparison\n' + _comparison(run, baseline))
    if citations:
        parts.append('## Citation\n' + ''.join(f'```bibtex\n{c}\n```\n' for c in citations))
    return '\n'.join(parts)

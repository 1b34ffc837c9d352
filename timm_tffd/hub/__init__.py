"""Publish a Tf-FD training run on the Hugging Face Hub as a plain timm model.

    python -m timm_tffd.hub push OUTPUT_DIR --repo-id ORG/NAME [--ema] [--baseline OTHER_OUTPUT_DIR] [--dry-run]

``OUTPUT_DIR`` is a training output folder in the layout of timm's ``train.py`` (``args.yaml``, ``summary.csv``,
``model_best.pth.tar``, ...). The repository gets ``model.safetensors`` (the plain timm weights: Tf-FD leaves the
architecture unchanged), ``config.json`` (architecture, classes, preprocessing) and a model card built from
``args.yaml`` and ``summary.csv``, so ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` loads it without
timm_tffd. Files are written by timm's ``save_for_hf`` / ``push_to_hf_hub``; checkpoints are read with
``torch.load(weights_only=True)``.
"""
import argparse
import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import yaml
import timm
from timm.data import ImageNetInfo, infer_imagenet_subset
from timm.models import clean_state_dict, push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx, validate_repo_id

from ..data.embedded import EMBEDDED_PATH

__all__ = ['TrainingRun', 'read_training_run', 'load_checkpoint', 'push_to_hub', 'CARD_ARG_PREFIXES', 'CITATIONS']

# argument prefixes listed in the model card: Tf-FD, SFD, self-distillation, teacher / KD, label smoothing
CARD_ARG_PREFIXES = ('tffd', 'sfd', 'sd_', 'self_distill', 'teacher', 'kd', 'smoothing')
# recipe keys shown besides them, when present
_RECIPE_KEYS = ('epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'img_size',
                'model_ema', 'model_ema_decay', 'amp', 'max_train_samples')
# arguments that describe the preprocessing (timm train.py names), passed to save_for_hf as its data_config
_DATA_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation',
              'model_kwargs')

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
SFD_BIBTEX = """@inproceedings{pei2021sfd,
  title     = {Self-boosting for Feature Distillation},
  author    = {Pei, Yulong and Qu, Yanyun and Zhang, Junping},
  booktitle = {International Joint Conference on Artificial Intelligence (IJCAI)},
  year      = {2021}
}"""
CITATIONS = (TFFD_BIBTEX, TFD_BIBTEX, SFD_BIBTEX)


@dataclass
class TrainingRun:
    """A training output folder: its arguments (args.yaml) and its per-epoch summary (summary.csv)."""
    path: Path
    args: Dict[str, Any]
    summary: List[Dict[str, Any]]

    @property
    def arch(self) -> str:
        return self.args['model']

    @property
    def eval_metric(self) -> str:
        return self.args.get('eval_metric') or 'top1'

    def final(self) -> Dict[str, float]:
        """The summary row of the last epoch."""
        return self.summary[-1]

    def best(self) -> Dict[str, float]:
        """The summary row of the best epoch by ``eval_metric`` (the first of equals, like timm's CheckpointSaver)."""
        key = f'eval_{self.eval_metric}'
        pick = min if self.eval_metric == 'loss' else max
        return pick((row for row in self.summary if row[key] is not None), key=lambda row: row[key])

    def methods(self) -> str:
        """The Tf-FD methods of the run as written in args.yaml, or ``'off'``."""
        value = self.args.get('tffd')
        if not value:
            return 'off'
        return ','.join(value) if isinstance(value, (list, tuple)) else str(value)


def _number(text: str) -> Union[float, str, None]:
    if text in ('', None):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_training_run(output_dir: Union[str, Path]) -> TrainingRun:
    """Read ``args.yaml`` and ``summary.csv`` of a training output folder.

    Args:
        output_dir: The folder written by the training script.
    """
    path = Path(output_dir)
    if not path.is_dir():
        raise ValueError(f'{path} is not a folder')
    missing = [n for n in ('args.yaml', 'summary.csv') if not (path / n).is_file()]
    if missing:
        raise ValueError(f'{path} is not a training output folder: {" and ".join(missing)} missing '
                         f'(expected the layout of timm train.py: args.yaml, summary.csv, model_best.pth.tar)')
    with open(path / 'args.yaml') as f:
        args = yaml.safe_load(f)
    if not isinstance(args, dict) or not args.get('model'):
        raise ValueError(f'{path / "args.yaml"} does not name a model (no "model" key): not a training output')
    with open(path / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    metric = f'eval_{args.get("eval_metric") or "top1"}'
    needed = {'epoch', 'eval_top1', 'eval_top5', metric}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f'{path / "summary.csv"} has no evaluated epochs (needs columns {sorted(needed)}): '
                         f'publish a run trained with validation')
    # a resumed run may repeat epochs: the last row of an epoch wins
    by_epoch = {int(r['epoch']): {k: _number(v) for k, v in r.items()} for r in rows}
    return TrainingRun(path, args, [by_epoch[e] for e in sorted(by_epoch)])


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a training checkpoint with ``torch.load(weights_only=True)``.

    ``argparse.Namespace`` (timm's saver stores the arguments as one) is the only class allowed besides tensors and
    containers; a checkpoint holding any other pickled object is refused, never unpickled.

    Args:
        path: A ``.pth.tar`` file written by timm's ``CheckpointSaver``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'checkpoint {path} not found')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        raise ValueError(f'refusing to load {path}: it contains pickled objects that weights_only loading does not '
                         f'allow ({", ".join(unsafe) or "unknown globals"}). Only tensors, containers and '
                         f'argparse.Namespace are accepted; nothing was unpickled.') from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise ValueError(f'{path} is not a timm training checkpoint (no state_dict)')
    return checkpoint


def _in_chans(args: Dict[str, Any]) -> int:
    """Input channels as timm train.py resolves them: in_chans, else input_size[0], else 3."""
    return args.get('in_chans') or (args.get('input_size') or [3])[0]


def _create_model(args: Dict[str, Any], **kwargs) -> nn.Module:
    """The timm model of a run, built from its arguments like timm train.py (without train-only options)."""
    return timm.create_model(
        args['model'],
        num_classes=args.get('num_classes'),
        in_chans=_in_chans(args),
        global_pool=args.get('gp'),
        bn_eps=args.get('bn_eps'),
        **(args.get('model_kwargs') or {}),
        **kwargs,
    )


def _resolved_args(run: TrainingRun, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """args.yaml updated with the checkpoint's ``args``.

    Like timm's train.py, the training script writes args.yaml as parsed, before defaults that depend on the data or
    the model are filled in (``num_classes``, ``in_chans``, ``img_size``, ``mean``, ...); the arguments saved in the
    checkpoint are the resolved ones the model was built with.
    """
    saved = checkpoint.get('args')
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    return {**run.args, **(saved or {})}


def _load_run_model(run: TrainingRun, checkpoint: str, ema: bool, **kwargs):
    """The run's plain timm model with the weights of ``checkpoint``, the loaded checkpoint and the resolved args."""
    state = load_checkpoint(run.path / checkpoint)
    arch = state.get('arch')
    if arch is not None and arch != run.arch:
        raise ValueError(f'{run.path / checkpoint} was saved for architecture {arch!r} but args.yaml says '
                         f'{run.arch!r}: the checkpoint does not belong to this run')
    key = 'state_dict_ema' if ema else 'state_dict'
    if key not in state:
        raise ValueError(f'{run.path / checkpoint} has no {key}' + (' (the run was trained without model EMA)'
                                                                     if ema else ''))
    args = _resolved_args(run, state)
    model = _create_model(args, **kwargs)
    try:
        model.load_state_dict(clean_state_dict(state[key]))
    except RuntimeError as e:
        raise ValueError(f'the {key} of {run.path / checkpoint} does not fit {run.arch} as built from the run\'s '
                         f'arguments (num_classes={model.num_classes}, in_chans={_in_chans(args)}): {e}') from e
    return model.eval(), state, args


def _read_label_names(path: Union[str, Path]) -> List[str]:
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def _is_embedded(args: Dict[str, Any]) -> bool:
    """A run on the embedded Fashion-MNIST subset: the training script uses it when given no data dir and no dataset."""
    return not args.get('data_dir') and not args.get('data') and not args.get('dataset')


def _resolve_label_names(args: Dict[str, Any], model: nn.Module, dataset: str, label_names) -> Dict[str, Any]:
    """``label_names`` (and ImageNet's ``label_descriptions``) for config.json."""
    out = {}
    if label_names is None and args.get('class_map'):
        class_map = Path(args['class_map'])
        if not class_map.exists():  # timm resolves a relative class map against the data folder
            class_map = Path(args.get('data_dir') or '') / class_map
        if class_map.suffix != '.txt':
            raise ValueError(f'class map {class_map} is not a .txt file: pass label_names')
        label_names = class_map
    if isinstance(label_names, (str, Path)):
        label_names = _read_label_names(label_names)
    if label_names is None and _is_embedded(args):
        with np.load(EMBEDDED_PATH) as data:
            label_names = data['classes'].tolist()
    if label_names is None:
        subset = infer_imagenet_subset(model)
        if subset is None or 'imagenet' not in dataset.lower():
            raise ValueError(f'cannot tell the class names of {dataset!r} ({model.num_classes} classes): pass '
                             f'label_names (--label-names FILE, one name per line)')
        info = ImageNetInfo(subset)
        label_names = info.label_names()
        out['label_descriptions'] = info.label_descriptions(as_dict=True)
    label_names = [str(n) for n in label_names]
    if len(label_names) != model.num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes')
    out['label_names'] = label_names
    return out


def _dataset_name(args: Dict[str, Any], dataset: Optional[str]) -> str:
    if dataset:
        return dataset
    if _is_embedded(args):
        return 'fashion_mnist'
    name = args.get('dataset') or Path(args.get('data_dir') or args.get('data') or '').name
    if not name:
        raise ValueError('the run\'s arguments name no dataset: pass dataset (--dataset-name)')
    return name


def _fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}'


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


def _usage(repo_id: str, arch: str, in_chans: int) -> str:
    mode = 'RGB' if in_chans == 3 else 'L'
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


def _model_card(
        run: TrainingRun,
        args: Dict[str, Any],
        model: nn.Module,
        repo_id: str,
        checkpoint: Dict[str, Any],
        checkpoint_name: str,
        ema: bool,
        dataset: str,
        baseline: Optional[TrainingRun],
        license: str,
) -> Dict[str, Any]:
    """The model card, as the dict that timm's ``generate_readme`` (called by ``push_to_hf_hub``) renders."""
    best, final = run.best(), run.final()
    # timm's train.py (and the training script) validate the EMA instead of the model when it is kept on the device
    evaluated = 'EMA' if args.get('model_ema') and not args.get('model_ema_force_cpu') else 'model'
    tffd_config = (checkpoint.get('task_state') or {}).get('tffd')
    details = {
        'Model type': 'Image classification',
        'Architecture': f'{run.arch} (plain timm: Tf-FD changes training, not the model)',
        'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        'Dataset': dataset,
        'Training recipe': {k: args[k] for k in _RECIPE_KEYS if args.get(k) is not None},
        'Tf-FD / SFD / SD / KD settings': {k: args[k] for k in sorted(args) if k.startswith(CARD_ARG_PREFIXES)},
        'Published weights': f'{"state_dict_ema" if ema else "state_dict"} of {checkpoint_name} '
                             f'(epoch {checkpoint.get("epoch")})',
        'Results': {
            'evaluated weights (summary.csv)': evaluated,
            f'top-1 / top-5, final (epoch {int(final["epoch"])})': f'{_fmt(final["eval_top1"])} / '
                                                                  f'{_fmt(final["eval_top5"])}',
            f'top-1 / top-5, best {run.eval_metric} (epoch {int(best["epoch"])})': f'{_fmt(best["eval_top1"])} / '
                                                                                  f'{_fmt(best["eval_top5"])}',
        },
    }
    if tffd_config:
        details['Tf-FD configuration (checkpoint)'] = {**tffd_config.get('config', {}),
                                                       'weights': tffd_config.get('weights')}
    methods = run.methods()
    trained = f'with Teacher-free Feature Distillation (Tf-FD: {methods})' if methods != 'off' else 'without Tf-FD'
    card = {
        'description': (
            f'A {run.arch} image classifier trained on {dataset} with the timm_tffd library, {trained}. Final top-1 '
            f'{_fmt(final["eval_top1"])}, top-5 {_fmt(final["eval_top5"])}; best top-1 {_fmt(best["eval_top1"])}, '
            f'top-5 {_fmt(best["eval_top5"])}. License: {license}.'),
        'details': details,
        'usage': _usage(repo_id, run.arch, _in_chans(args)),
        'citation': list(CITATIONS),
        'license': license,
        'tags': ['image-classification', 'timm', 'tffd', 'knowledge-distillation'],
    }
    if baseline is not None:
        card['comparison'] = _comparison(run, baseline)
    return card


@dataclass
class _Export:
    """Everything a repository is written from."""
    model: nn.Module
    model_config: Dict[str, Any]
    data_config: Dict[str, Any]
    card: Dict[str, Any]


def _prepare(
        output_dir: Union[str, Path],
        repo_id: str,
        checkpoint: str,
        ema: bool,
        baseline: Optional[Union[str, Path]],
        label_names: Optional[Union[str, Path, Sequence[str]]],
        dataset: Optional[str],
        license: str,
) -> _Export:
    validate_repo_id(repo_id)
    if '/' not in repo_id:
        raise ValueError(f'repo_id must be ORG/NAME (the hf-hub: name that loads it), got {repo_id!r}')
    run = read_training_run(output_dir)
    base = read_training_run(baseline) if baseline is not None else None
    name = repo_id.split('/')[1]
    # the registry default pretrained_cfg describes other weights: replace what names or credits them
    paper = 'Self-Regulated Feature Learning via Teacher-free Feature Distillation' if run.methods() != 'off' else None
    overlay = dict(tag=name.split('.', 1)[1] if '.' in name else None, license=license, origin_url=None,
                   paper_ids=None, paper_name=paper)
    model, state, args = _load_run_model(run, checkpoint, ema, pretrained_cfg_overlay=overlay)
    dataset = _dataset_name(args, dataset)
    model_config = _resolve_label_names(args, model, dataset, label_names)
    data_config = {k: args[k] for k in _DATA_KEYS if args.get(k) not in (None, '', {})}
    card = _model_card(run, args, model, repo_id, state, checkpoint, ema, dataset, base, license)
    return _Export(model, model_config, data_config, card)


def _upload(export: _Export, repo_id: str, token: Optional[str], private: bool, exist_ok: bool,
            commit_message: str) -> str:
    token = token or get_token()
    if not token:
        raise ValueError('no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write '
                         'access (or use --dry-run to write the repository folder locally)')
    try:
        HfApi(token=token).create_repo(repo_id, private=private, exist_ok=exist_ok)
        commit = push_to_hf_hub(
            export.model, repo_id, commit_message=commit_message, token=token, private=private,
            model_config=export.model_config, model_card=export.card, safe_serialization=True,
            data_config=export.data_config)
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status == 409:
            raise ValueError(f'{repo_id} already exists on the Hugging Face Hub: choose another repo id, delete it, '
                             f'or pass exist_ok (--exist-ok) to add a commit to it') from e
        if status in (401, 403):
            raise PermissionError(f'the Hugging Face Hub refused the token for {repo_id} (HTTP {status}): it must '
                                  f'have write access to the namespace {repo_id.split("/")[0]!r}') from e
        raise ConnectionError(f'the Hugging Face Hub answered HTTP {status} for {repo_id}: '
                              f'{e.server_message or e}') from e
    except (httpx.TransportError, OfflineModeIsEnabled) as e:
        raise ConnectionError(f'cannot reach the Hugging Face Hub ({type(e).__name__}: {e}). If {repo_id} was '
                              f'created before the failure, push again with exist_ok (--exist-ok).') from e
    return str(commit.commit_url)


def push_to_hub(
        output_dir: Union[str, Path],
        repo_id: str,
        checkpoint: str = 'model_best.pth.tar',
        ema: bool = False,
        baseline: Optional[Union[str, Path]] = None,
        label_names: Optional[Union[str, Path, Sequence[str]]] = None,
        dataset: Optional[str] = None,
        license: str = 'apache-2.0',
        dry_run: bool = False,
        save_dir: Optional[Union[str, Path]] = None,
        token: Optional[str] = None,
        private: bool = False,
        exist_ok: bool = False,
        commit_message: str = 'Add Tf-FD weights',
) -> str:
    """Turn a training output folder into a timm model repository on the Hugging Face Hub.

    Everything is read and checked before anything is uploaded. The repository holds ``model.safetensors`` only (no
    pickled weights), ``config.json`` and README.md.

    Args:
        output_dir: Training output folder (args.yaml, summary.csv, checkpoints).
        repo_id: ``ORG/NAME``, e.g. ``my-org/resnet50.tffd_in1k``; the part after the first dot of NAME becomes
            the pretrained tag.
        checkpoint: Checkpoint file to publish, ``model_best.pth.tar`` by default.
        ema: Publish its EMA weights (``state_dict_ema``) instead of the model weights.
        baseline: Output folder of a baseline run of the same model, for a results table in the card.
        label_names: Class names, or a text file with one per line. Default: args.yaml's ``class_map`` (.txt), else
            the ImageNet synsets when the dataset is an ImageNet subset.
        dataset: Dataset name for the card; default args.yaml's ``dataset``, else the name of ``data_dir``.
        license: License of the weights (Hub metadata).
        dry_run: Write the repository folder locally, upload nothing.
        save_dir: Folder for ``dry_run``; default ``OUTPUT_DIR/hub/NAME``. It must be new or empty.
        token: Hub token; default the usual huggingface_hub places (``HF_TOKEN``, ``hf auth login``).
        private: Create a private repository.
        exist_ok: Add a commit to an existing repository instead of refusing it (timm keeps an existing README.md).
        commit_message: Commit message of the upload.

    Returns:
        The dry-run folder, or the URL of the commit.
    """
    export = _prepare(output_dir, repo_id, checkpoint, ema, baseline, label_names, dataset, license)
    if not dry_run:
        return _upload(export, repo_id, token, private, exist_ok, commit_message)
    save_dir = Path(save_dir) if save_dir is not None else Path(output_dir) / 'hub' / repo_id.split('/')[1]
    if save_dir.exists() and any(save_dir.iterdir()):
        raise ValueError(f'{save_dir} is not empty: choose another folder or remove it')
    save_for_hf(export.model, save_dir, model_config=export.model_config, safe_serialization=True,
                data_config=export.data_config)
    (save_dir / 'README.md').write_text(generate_readme(export.card, repo_id.split('/')[1]), encoding='utf-8')
    return str(save_dir)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog='python -m timm_tffd.hub', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    push = commands.add_parser('push', help='publish a training output folder as a timm model repository')
    push.add_argument('output_dir', metavar='OUTPUT_DIR', help='training output folder (args.yaml, summary.csv, ...)')
    push.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='e.g. my-org/resnet50.tffd_in1k')
    push.add_argument('--checkpoint', default='model_best.pth.tar', help='checkpoint file in OUTPUT_DIR')
    push.add_argument('--ema', action='store_true', help='publish the EMA weights of the checkpoint')
    push.add_argument('--baseline', metavar='OTHER_OUTPUT_DIR', help='baseline run for a results table')
    push.add_argument('--label-names', metavar='FILE', help='class names, one per line')
    push.add_argument('--dataset-name', help='dataset name for the card (default from args.yaml)')
    push.add_argument('--license', default='apache-2.0', help='license of the weights (default: apache-2.0)')
    push.add_argument('--dry-run', action='store_true', help='write the repository folder locally, upload nothing')
    push.add_argument('--out', metavar='DIR', help='folder for --dry-run (default OUTPUT_DIR/hub/NAME)')
    push.add_argument('--private', action='store_true', help='create a private repository')
    push.add_argument('--exist-ok', action='store_true', help='add a commit to an existing repository')
    push.add_argument('--commit-message', default='Add Tf-FD weights')
    args = parser.parse_args(argv)
    try:
        result = push_to_hub(
            args.output_dir, args.repo_id, checkpoint=args.checkpoint, ema=args.ema, baseline=args.baseline,
            label_names=args.label_names, dataset=args.dataset_name, license=args.license, dry_run=args.dry_run,
            save_dir=args.out, private=args.private, exist_ok=args.exist_ok, commit_message=args.commit_message)
    except (ValueError, PermissionError, ConnectionError) as e:
        parser.exit(1, f'{parser.prog} push: error: {e}\n')
    print(f'wrote {result}' if args.dry_run else f'pushed {result}')


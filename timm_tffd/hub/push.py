"""Export a training run as a timm model repository and upload it to the Hugging Face Hub.

The repository holds ``model.safetensors`` (the plain timm weights: Tf-FD leaves the architecture unchanged) and
``config.json`` (architecture, classes, preprocessing), both written by timm's ``save_for_hf``, and the model card, so
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` loads it without timm_tffd. An upload sends the folder that
a dry run writes.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Dict, Optional, Sequence, Union

import torch.nn as nn
from timm.models import save_for_hf
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx, validate_repo_id

from .card import model_card
from .labels import resolve_label_names
from .run import dataset_name, load_run_model, read_training_run

__all__ = ['HubExport', 'prepare_export', 'save_export', 'push_to_hub']

# arguments that describe the preprocessing (timm train.py names), passed to save_for_hf as its data_config
_DATA_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation',
              'model_kwargs')
_PAPER = 'Self-Regulated Feature Learning via Teacher-free Feature Distillation'


@dataclass
class HubExport:
    """What a repository is written from.

    Args:
        model: The plain timm model with the published weights.
        model_config: Extra config.json entries (``label_names``, ...).
        data_config: The preprocessing the run was evaluated with, for ``pretrained_cfg``.
        card: The model card (README.md).
    """
    model: nn.Module
    model_config: Dict[str, Any]
    data_config: Dict[str, Any]
    card: str


def prepare_export(
        output_dir: Union[str, Path],
        repo_id: str,
        checkpoint: str = 'model_best.pth.tar',
        ema: bool = False,
        baseline: Optional[Union[str, Path]] = None,
        label_names: Optional[Union[str, Path, Sequence[str]]] = None,
        dataset: Optional[str] = None,
        license: str = 'apache-2.0',
) -> HubExport:
    """Read and check a training run and build everything its repository is written from (see ``push_to_hub``)."""
    validate_repo_id(repo_id)
    if '/' not in repo_id:
        raise ValueError(f'repo_id must be ORG/NAME (the hf-hub: name that loads it), got {repo_id!r}')
    run = read_training_run(output_dir)
    base = read_training_run(baseline) if baseline is not None else None
    name = repo_id.split('/')[1]
    # the registry default pretrained_cfg describes other weights: replace what names or credits them
    overlay = dict(tag=name.split('.', 1)[1] if '.' in name else None, license=license, origin_url=None,
                   paper_ids=None, paper_name=_PAPER if run.methods() != 'off' else None)
    model, state, args = load_run_model(run, checkpoint, ema, pretrained_cfg_overlay=overlay)
    dataset = dataset_name(args, dataset)
    model_config = resolve_label_names(args, model, dataset, label_names)
    data_config = {k: args[k] for k in _DATA_KEYS if args.get(k) not in (None, '', {})}
    card = model_card(run, state, model, repo_id, checkpoint, ema, dataset, base, license)
    return HubExport(model, model_config, data_config, card)


def _default_file_mode() -> int:
    """The mode a new file gets under the process umask (0o644 with umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_export(export: HubExport, save_dir: Union[str, Path]) -> Path:
    """Write the repository folder: ``model.safetensors``, ``config.json`` and README.md.

    Files get the permissions of any new file of the user (safetensors writes its file readable by the owner only).

    Args:
        export: What to write.
        save_dir: The folder; it must be new or empty.
    """
    save_dir = Path(save_dir)
    if save_dir.exists() and any(save_dir.iterdir()):
        raise ValueError(f'{save_dir} is not empty: choose another folder or remove it')
    save_for_hf(export.model, save_dir, model_config=export.model_config, safe_serialization=True,
                data_config=export.data_config)
    (save_dir / 'README.md').write_text(export.card, encoding='utf-8')
    mode = _default_file_mode()
    for path in save_dir.iterdir():
        path.chmod(mode)
    return save_dir


def _upload(export: HubExport, repo_id: str, token: Optional[str], private: bool, exist_ok: bool,
            commit_message: str) -> str:
    token = token or get_token()
    if not token:
        raise ValueError('no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write '
                         'access (or use --dry-run to write the repository folder locally)')
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=exist_ok)
        with TemporaryDirectory() as folder:
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(save_export(export, folder)),
                                       commit_message=commit_message)
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
        label_names: Class names, or a text file with one per line. Default: args.yaml's ``class_map`` (.txt), the
            embedded Fashion-MNIST classes, or the ImageNet synsets when the dataset is an ImageNet subset.
        dataset: Dataset name for the card; default args.yaml's ``dataset``, else the name of ``data_dir``.
        license: License of the weights (Hub metadata).
        dry_run: Write the repository folder locally, upload nothing.
        save_dir: Folder for ``dry_run``; default ``OUTPUT_DIR/hub/NAME``. It must be new or empty.
        token: Hub token; default the usual huggingface_hub places (``HF_TOKEN``, ``hf auth login``).
        private: Create a private repository.
        exist_ok: Add a commit to an existing repository instead of refusing it (its model.safetensors,
            config.json and README.md are replaced).
        commit_message: Commit message of the upload.

    Returns:
        The dry-run folder, or the URL of the commit.
    """
    export = prepare_export(output_dir, repo_id, checkpoint, ema, baseline, label_names, dataset, license)
    if not dry_run:
        return _upload(export, repo_id, token, private, exist_ok, commit_message)
    save_dir = Path(save_dir) if save_dir is not None else Path(output_dir) / 'hub' / repo_id.split('/')[1]
    return str(save_export(export, save_dir))

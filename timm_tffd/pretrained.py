"""Pretrained Tf-FD checkpoints on the Hugging Face Hub: names, and a safetensors-only ``create_model``.

Tf-FD changes training only, so a published checkpoint is a plain timm model: ``timm.create_model('hf-hub:ORG/name',
pretrained=True)`` loads it without this package. ``timm_tffd.create_model`` adds the short names of
``list_pretrained()`` and refuses any weights that are not ``model.safetensors`` (nothing is unpickled).
"""
import fnmatch
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.nn as nn
import timm
from timm.models import get_pretrained_cfg, parse_model_name, split_model_name_tag
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

__all__ = ['HUB_ORG', 'list_pretrained', 'resolve_pretrained_name', 'create_model']

# Hub namespace of the published Tf-FD checkpoints. The names below are planned: none is trained yet. Each becomes
# loadable once its recipe (README, "Pretrained Tf-FD checkpoints") has been run and pushed with
# ``python -m timm_tffd.hub push OUTPUT_DIR --repo-id timm-tffd/NAME``.
HUB_ORG = 'timm-tffd'

_PRETRAINED = (
    'resnet18.tffd_in1k',
    'resnet50.tffd_in1k',
)

_SAFE_WEIGHTS = 'model.safetensors'
# pretrained_cfg keys that would pick another weight source or loader
_SOURCE_KEYS = ('file', 'url', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'custom_load')


def list_pretrained(filter: str = '*') -> List[str]:
    """Names of the Tf-FD checkpoints, e.g. ``resnet50.tffd_in1k`` (hub id ``HUB_ORG/name``).

    They are planned names: each loads once its recipe has been run and pushed to the ``HUB_ORG`` namespace; until
    then ``create_model(name, pretrained=True)`` reports that the repository does not exist.

    Args:
        filter: Wildcard pattern (``fnmatch``), e.g. ``'resnet50*'``.
    """
    return [n for n in _PRETRAINED if fnmatch.fnmatch(n, filter)]


def resolve_pretrained_name(model_name: str) -> str:
    """Map a name of ``list_pretrained()`` to ``hf-hub:HUB_ORG/name``; other names are returned unchanged."""
    return f'hf-hub:{HUB_ORG}/{model_name}' if model_name in _PRETRAINED else model_name


def _safe_overlay(source: Optional[str], model_id: str, overlay: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load ``model.safetensors`` and nothing else."""
    overlay = dict(overlay or {})
    clash = sorted(k for k in _SOURCE_KEYS if k in overlay)
    if clash:
        raise ValueError(f'pretrained_cfg_overlay keys {clash} would choose the weight source; timm_tffd.create_model '
                         f'only loads {_SAFE_WEIGHTS}. Use timm.create_model to load other formats.')
    if source == 'local-dir':
        # timm's local-dir loader prefers model.safetensors when present: require it to be there
        if not (Path(model_id) / _SAFE_WEIGHTS).is_file():
            raise ValueError(f'{model_id} has no {_SAFE_WEIGHTS}; timm_tffd loads weights from safetensors only')
        return overlay
    if source is None:
        # a timm registry name: its weights must come from a Hub repository, as safetensors
        name, tag = split_model_name_tag(model_id)
        cfg = get_pretrained_cfg(f'{name}.{tag}' if tag else name)
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(f'{model_id} has no Hugging Face Hub weights; timm_tffd loads {_SAFE_WEIGHTS} '
                             f'from the Hub only')
    # hf-hub (and registry hub ids): a .safetensors filename makes timm call safetensors.torch.load_file directly,
    # without its pickle fallback; custom_load=False keeps a repository's config from picking a custom loader
    overlay.update(hf_hub_filename=_SAFE_WEIGHTS, custom_load=False)
    return overlay


def create_model(
        model_name: str,
        pretrained: bool = False,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """``timm.create_model`` that knows the Tf-FD names and loads pretrained weights from safetensors only.

    ``resnet50.tffd_in1k`` (see ``list_pretrained()``) becomes ``hf-hub:HUB_ORG/resnet50.tffd_in1k``; ``hf-hub:``,
    ``local-dir:`` and timm registry names pass through. With ``pretrained=True`` the weights must be a
    ``model.safetensors`` file; a repository or folder that holds only pickled weights (``.bin``, ``.pth``) is
    refused. ``hf-hub:`` names read ``config.json`` from the Hub even with ``pretrained=False``; a local Hub cache
    serves both offline (``HF_HUB_OFFLINE=1``).

    Args:
        model_name: A Tf-FD name, ``hf-hub:org/name[@revision]``, ``local-dir:/path`` or a timm model name.
        pretrained: Load the published weights.
        pretrained_cfg_overlay: As in timm, except for the keys that choose the weight source.
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``cache_dir``, ...).
    """
    model_name = resolve_pretrained_name(model_name)
    source, model_id = parse_model_name(model_name)
    if pretrained:
        pretrained_cfg_overlay = _safe_overlay(source, model_id, pretrained_cfg_overlay)
    try:
        return timm.create_model(
            model_name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
    except RepositoryNotFoundError as e:
        planned = model_id.split('@')[0] in [f'{HUB_ORG}/{n}' for n in _PRETRAINED]
        published = (' It is one of the planned Tf-FD checkpoints, available once its recipe has been run and pushed.'
                     if planned else '')
        raise ValueError(f'{model_name}: no such repository on the Hugging Face Hub (or it is private).'
                         f'{published}') from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f'{model_name}: config.json or {_SAFE_WEIGHTS} is not in the local Hub cache and '
                                f'the Hub cannot be reached (offline). timm_tffd loads weights from safetensors '
                                f'only.') from e
    except EntryNotFoundError as e:
        raise ValueError(f'{model_name}: the repository lacks config.json or {_SAFE_WEIGHTS}; timm_tffd loads '
                         f'weights from safetensors only.') from e

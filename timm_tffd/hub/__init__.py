"""Publish a Tf-FD training run on the Hugging Face Hub as a plain timm model.

    python -m timm_tffd.hub push OUTPUT_DIR --repo-id ORG/NAME [--ema] [--baseline OTHER_OUTPUT_DIR] [--dry-run]

``run`` reads a training output folder, ``labels`` finds the class names, ``card`` writes the model card, ``push``
exports and uploads the repository, ``cli`` is the command line.
"""
from .card import CITATIONS, model_card, tffd_config
from .cli import main
from .labels import resolve_label_names
from .push import HubExport, prepare_export, push_to_hub, save_export
from .run import TrainingRun, load_checkpoint, load_run_model, load_state_dict, read_training_run

__all__ = ['TrainingRun', 'read_training_run', 'load_checkpoint', 'load_state_dict', 'load_run_model',
           'resolve_label_names', 'model_card', 'tffd_config', 'CITATIONS', 'HubExport', 'prepare_export',
           'save_export', 'push_to_hub', 'main']

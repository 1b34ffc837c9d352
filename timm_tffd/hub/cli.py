"""Command line: ``python -m timm_tffd.hub push OUTPUT_DIR --repo-id ORG/NAME [--dry-run --out DIR] ...``.

``OUTPUT_DIR`` is a training output folder in the layout of timm's ``train.py`` (``args.yaml``, ``summary.csv``,
``model_best.pth.tar``, ...); it is published as a plain timm model repository (see ``push_to_hub``).
"""
import argparse
from typing import Optional, Sequence

from .push import push_to_hub

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; bad input exits with one error line."""
    parser = argparse.ArgumentParser(prog='python -m timm_tffd.hub',
                                     description='Publish a Tf-FD training run on the Hugging Face Hub as a plain '
                                                 'timm model.')
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
    except (ValueError, OSError) as e:  # PermissionError and ConnectionError are OSErrors
        parser.exit(1, f'{parser.prog} push: error: {e}\n')
    print(f'wrote {result}' if args.dry_run else f'pushed {result}')

"""Shared helpers for the training-script tests: run ``train_timm_tffd.py`` in-process or as a subprocess."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# A tiny run on the embedded data: 64 training and 64 validation images at 32 px, batch 32 (2 steps per epoch).
TINY = ['--model', 'test_resnet', '-b', '32', '-j', '0', '--max-train-samples', '64', '--max-val-samples', '64',
        '--epochs', '2', '--warmup-epochs', '0', '--log-interval', '1']


@pytest.fixture
def run_train(tmp_path):
    """Call ``train_timm_tffd.main`` in this process with ``--output <tmp>/out``; returns its ``TrainResult``."""
    import train_timm_tffd

    def _run(*argv):
        # one thread, as in run_script's subprocesses: runs compared bit for bit must reduce in the same order
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return train_timm_tffd.main(['--output', str(tmp_path / 'out'), *map(str, argv)])
        finally:
            torch.set_num_threads(threads)
    return _run


def run_script(script: str, *argv, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a Python file (or ``-m module``) in a fresh interpreter with one thread, the repository on the path."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, *(script.split() if script.startswith('-m ') else [script]), *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def load_checkpoint(path) -> dict:
    """A training checkpoint, loaded without unpickling anything but tensors, containers and argparse.Namespace."""
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)

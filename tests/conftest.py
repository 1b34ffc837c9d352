"""Shared helpers for the training-script tests: run ``train_timm_tffd.py`` in-process or as a subprocess."""
import contextlib
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


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_file: str):
    """A one-thread CPU process group for a DDP test worker; destroyed on exit."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker, tmp_path, world_size: int = 2) -> list:
    """Run ``worker(rank, world_size, init_file, out_dir)`` on forked ranks; return what each saved as
    ``out_dir/rank<r>.pt`` (forked: the workers inherit the imported modules instead of importing torch again)."""
    import torch.multiprocessing as mp
    mp.start_processes(worker, args=(world_size, str(tmp_path / 'init'), str(tmp_path)), nprocs=world_size, join=True,
                       start_method='fork')
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(world_size)]

"""Faults a training run must survive or report in one line: interrupts, kills between the writes of an epoch,
corrupt checkpoint files, a full disk, an output path that is a file, a class count below the dataset's."""
import csv
import errno
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, load_checkpoint, run_script


def _rows(path):
    with open(os.path.join(path, 'summary.csv')) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize('sig, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exits_non_zero_and_resumes(run_train, tmp_path, sig, code):
    """An interrupt after the first checkpoint: exit 130 / 143, no "Final" line, the finished epochs' files and rows
    intact, and --resume continues from them to the end."""
    args = [*TINY, '--epochs', '200', '--output', tmp_path / 'out', '--experiment', 'cut']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    # a shell without job control starts background jobs with SIGINT ignored, which Python keeps: restore it
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train_timm_tffd.py'), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = tmp_path / 'out' / 'cut'
    deadline = time.time() + 120
    while not (out / 'last.pth.tar').exists():  # written by an atomic rename: the first checkpoint is complete
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-2000:]
    assert 'Final' not in stdout + stderr and 'Traceback' not in stderr
    assert f'Interrupted by {sig.name}' in stderr and '--resume' in stderr
    last = load_checkpoint(out / 'last.pth.tar')
    epochs = [int(r['epoch']) for r in _rows(out)]
    # a signal between an epoch's summary row (written first) and its checkpoint leaves that one row ahead of
    # last.pth.tar: the resume repeats the epoch and replaces the row (checked below)
    assert epochs in (list(range(last['epoch'] + 1)), list(range(last['epoch'] + 2)))
    resumed = run_train(*TINY, '--epochs', str(last['epoch'] + 2), '--experiment', 'cut', '--resume',
                        out / 'last.pth.tar', '--output', tmp_path / 'out')
    assert [r['epoch'] for r in resumed.results] == [last['epoch'] + 1]
    assert [int(r['epoch']) for r in _rows(out)] == list(range(last['epoch'] + 2))


_KILL_AFTER_LAST = '''
import os, sys
import train_timm_tffd
from timm_tffd.checkpoint import AtomicCheckpointSaver

real = AtomicCheckpointSaver._duplicate


def duplicate(self, src, dst):
    if os.path.basename(dst) == 'checkpoint-1.pth.tar':  # last.pth.tar of epoch 1 is complete: die now
        os._exit(9)
    return real(self, src, dst)


AtomicCheckpointSaver._duplicate = duplicate
train_timm_tffd.main(sys.argv[1:])
'''


def test_kill_after_last_is_completed_on_resume(run_train, tmp_path):
    """Killed right after epoch 1's last.pth.tar: its summary row is there (written first), and the resume writes
    the missing checkpoint-1 and, epoch 1 being the best by validation loss, model_best from last.pth.tar."""
    args = [*TINY, '--epochs', '3', '--eval-metric', 'loss', '--lr', '0.05']
    script = tmp_path / 'killed.py'
    script.write_text(_KILL_AFTER_LAST)
    proc = run_script(str(script), '--output', tmp_path / 'out', *args, '--experiment', 'k')
    assert proc.returncode == 9, proc.stderr[-2000:]
    out = tmp_path / 'out' / 'k'
    assert load_checkpoint(out / 'last.pth.tar')['epoch'] == 1
    assert not (out / 'checkpoint-1.pth.tar').exists()
    assert [r['epoch'] for r in _rows(out)] == ['0', '1']
    losses = [float(r['eval_loss']) for r in _rows(out)]
    resumed = run_train(*args, '--experiment', 'k', '--resume', out / 'last.pth.tar')
    assert [r['epoch'] for r in resumed.results] == [2]
    assert load_checkpoint(out / 'checkpoint-1.pth.tar')['epoch'] == 1
    best = load_checkpoint(out / 'model_best.pth.tar')
    all_losses = losses + [resumed.results[0]['validation']['loss']]
    assert best['epoch'] == min(range(3), key=lambda e: all_losses[e])
    assert [r['epoch'] for r in _rows(out)] == ['0', '1', '2']
    assert not [f for f in os.listdir(out) if f.endswith('.partial')]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize('flag, content, message', [
    ('--resume', os.urandom(2000), 'cannot resume from'),
    ('--resume', b'', 'cannot resume from'),
    ('--initial-checkpoint', os.urandom(2000), 'cannot create model test_resnet from'),
    # random bytes fail in torch.load's unpickler or before it, depending on the bytes: either message names the file
    ('--teacher-checkpoint', os.urandom(2000), ('refusing to load', 'cannot load the teacher test_resnet from')),
    ('--teacher-checkpoint', pickle.dumps({'state_dict': {'w': object()}}), 'refusing to load'),
    # a string opcode whose bytes are not UTF-8: the unpickler raises UnicodeDecodeError, a ValueError
    ('--teacher-checkpoint', b'X\x04\x00\x00\x00\xfa\xfb\xfc\xfd.' + bytes(100),
     'cannot load the teacher test_resnet from'),
], ids=['resume-random', 'resume-empty', 'initial-random', 'teacher-random', 'teacher-pickle', 'teacher-utf8'])
def test_corrupt_checkpoint_files_get_one_message(run_train, tmp_path, capsys, flag, content, message):
    path = _write(tmp_path / 'bad.pth.tar', content)
    extra = ['--teacher', 'test_resnet'] if flag == '--teacher-checkpoint' else []
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, *extra, flag, path, '--experiment', 'bad')
    text = str(e.value.code)
    messages = message if isinstance(message, tuple) else (message,)
    assert text.startswith('error: ') and any(m in text for m in messages) and str(path) in text, text
    assert 'Traceback' not in capsys.readouterr().err
    assert not (tmp_path / 'out' / 'bad').exists()


def test_full_disk_during_a_save(run_train, tmp_path, monkeypatch):
    """A full disk while epoch 1's checkpoint is written: torch's zip writer says only "unexpected pos"; the message
    names the cause (the file system is full right after the failed write) and the last complete checkpoint, which
    stays epoch 0's."""
    from timm_tffd import checkpoint
    real = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            with open(f, 'wb') as fh:
                fh.write(b'part of a checkpoint')
            monkeypatch.setattr(checkpoint, 'free_bytes', lambda directory: 0)
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, '--experiment', 'full')
    text = str(e.value.code)
    assert 'No space left on device' in text and 'the last complete checkpoint is' in text, text
    out = tmp_path / 'out' / 'full'
    assert load_checkpoint(out / 'last.pth.tar')['epoch'] == 0
    assert not [f for f in os.listdir(out) if f.endswith('.partial')]


def test_output_path_that_is_a_file(run_train, tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'taken').write_text('not a folder')
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, '--experiment', 'taken')
    assert str(e.value.code).startswith('error: the output path') and 'is a file' in str(e.value.code)


def test_class_count_below_the_datasets(run_train, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, '--num-classes', '3', '--experiment', 'nc')
    assert 'the training split has 10 classes but the model has 3 outputs' in str(e.value.code)
    assert not (tmp_path / 'out' / 'nc').exists()


def test_missing_validation_split_is_named(run_train, tmp_path, caplog):
    from PIL import Image
    root = tmp_path / 'data'
    for c in ('a', 'b'):
        (root / 'train' / c).mkdir(parents=True)
        for i in range(8):
            Image.new('L', (8, 8), color=i * 20).save(root / 'train' / c / f'{i}.png')
    run = run_train(root, '--model', 'test_resnet', '--in-chans', '1', '--img-size', '32', '-b', '8', '-j', '0',
                    '--epochs', '1', '--num-classes', '2', '--experiment', 'nv')
    assert run.results
    assert any("No 'validation' split" in r.getMessage() and 'training images' in r.getMessage()
               for r in caplog.records if r.levelname == 'WARNING')


def test_read_only_output(run_train, tmp_path, monkeypatch):
    """A folder that cannot be created (read-only file system; simulated: the tests may run as root)."""
    import train_timm_tffd

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(train_timm_tffd.os, 'makedirs', refuse)
    with pytest.raises(SystemExit) as e:
        run_train(*TINY, '--experiment', 'ro')
    assert str(e.value.code) == f"error: cannot write '{tmp_path / 'out' / 'ro'}': Permission denied"

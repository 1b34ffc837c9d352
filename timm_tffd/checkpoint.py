"""``AtomicCheckpointSaver``: timm's ``CheckpointSaver`` with every file written atomically.

Each file (checkpoint, ``last``, ``model_best``, recovery, ``args.yaml``) is written to a ``.partial`` scratch file,
fsynced and renamed over its target with ``os.replace``, so it appears complete or not at all and a run killed during
a save keeps the files of its earlier epochs. What timm's saver does differently: docs/design.md.
"""
import os
import shutil

from timm.utils import CheckpointSaver

__all__ = ['AtomicCheckpointSaver', 'atomic_write_text']

_PARTIAL = '.partial'


def _fsync_path(path: str, directory: bool = False):
    """Flush a file, or a directory entry after a rename, to disk (best effort where the OS has no such call)."""
    flags = os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # directories cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _commit(scratch: str, target: str):
    """Atomically move a finished scratch file onto ``target``."""
    _fsync_path(scratch)
    os.replace(scratch, target)
    _fsync_path(os.path.dirname(os.path.abspath(target)), directory=True)


def atomic_write_text(path: str, text: str):
    """Write a small text file (``args.yaml``) so that readers see the old or the new content, never a mix."""
    scratch = path + _PARTIAL
    try:
        with open(scratch, 'w') as f:
            f.write(text)
        _commit(scratch, path)
    except BaseException:
        _remove_quietly(scratch)
        raise


class AtomicCheckpointSaver(CheckpointSaver):
    """``timm.utils.CheckpointSaver`` whose checkpoint, ``last``, ``model_best`` and recovery files are atomic.

    Same constructor, methods and on-disk layout as timm's saver; only the three file operations change.
    """

    def _save(self, save_path, epoch, metric=None):
        scratch = save_path + _PARTIAL
        try:
            super()._save(scratch, epoch, metric)
            _commit(scratch, save_path)
        except BaseException:
            _remove_quietly(scratch)
            raise

    def _replace(self, src, dst):
        _commit(src, dst)

    def _duplicate(self, src, dst):
        scratch = dst + _PARTIAL
        _remove_quietly(scratch)
        try:
            if self.can_hardlink:
                try:
                    os.link(src, scratch)
                except (OSError, NotImplementedError):
                    self.can_hardlink = False
            if not self.can_hardlink:
                shutil.copy2(src, scratch)
            _commit(scratch, dst)
            _remove_quietly(scratch)  # rename() is a no-op when both names are links to the same file
        except BaseException:
            _remove_quietly(scratch)
            raise

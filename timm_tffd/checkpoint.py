"""``AtomicCheckpointSaver``: timm's ``CheckpointSaver`` with every file written atomically.

Each file (checkpoint, ``last``, ``model_best``, recovery, ``args.yaml``) is written to a ``.partial`` scratch file,
fsynced and renamed over its target with ``os.replace``, so it appears complete or not at all and a run killed during
a save keeps the files of its earlier epochs. What timm's saver does differently: docs/design.md.
"""
import errno
import logging
import os
import shutil

from timm.utils import CheckpointSaver, load_checkpoint_metadata, trim_summary, update_summary

__all__ = ['AtomicCheckpointSaver', 'atomic_write_text', 'append_summary', 'trim_summary_atomic']

_logger = logging.getLogger(__name__)

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


_FULL = 4 * 2 ** 20  # a file system with less free space than this, right after a failed write, is full


def free_bytes(directory: str) -> int:
    """Bytes this process may still write on ``directory``'s file system (root may use the reserved blocks)."""
    st = os.statvfs(directory)
    return (st.f_bfree if hasattr(os, 'geteuid') and os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _atomic_edit(path: str, edit):
    """Apply ``edit(scratch_path)`` to a copy of ``path`` (if it exists) and rename the copy over it."""
    scratch = path + _PARTIAL
    try:
        if os.path.exists(path):
            shutil.copy2(path, scratch)
        else:
            _remove_quietly(scratch)
        edit(scratch)
        if os.path.exists(scratch):
            _commit(scratch, path)
    except BaseException:
        _remove_quietly(scratch)
        raise


def append_summary(path: str, epoch: int, train_metrics, eval_metrics, lr=None, log_wandb: bool = False):
    """timm's ``update_summary`` (one CSV row per epoch), applied to a copy that replaces ``summary.csv`` atomically:
    a kill leaves the old file or the new one, never half a row."""
    _atomic_edit(path, lambda scratch: update_summary(epoch, train_metrics, eval_metrics, scratch, lr=lr,
                                                      log_wandb=log_wandb))


def trim_summary_atomic(path: str, start_epoch: int):
    """timm's ``trim_summary`` (drop rows at or after ``start_epoch``, for a resumed run), atomically."""
    if os.path.exists(path):
        _atomic_edit(path, lambda scratch: trim_summary(scratch, start_epoch))


class AtomicCheckpointSaver(CheckpointSaver):
    """``timm.utils.CheckpointSaver`` whose checkpoint, ``last``, ``model_best`` and recovery files are atomic.

    Same constructor, methods and on-disk layout as timm's saver; only the three file operations change.
    """

    def _save(self, save_path, epoch, metric=None):
        scratch = save_path + _PARTIAL
        try:
            super()._save(scratch, epoch, metric)
            _commit(scratch, save_path)
        except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos ..."
            full = free_bytes(os.path.dirname(os.path.abspath(scratch))) < _FULL
            _remove_quietly(scratch)
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), save_path) from e
            raise
        except BaseException:
            _remove_quietly(scratch)
            raise

    def _replace(self, src, dst):
        _commit(src, dst)

    def resume_from(self, checkpoint_path: str):
        """Restore the checkpoint history from ``checkpoint_path`` (timm's ``load_state_dict_from_checkpoint``) and,
        when it is this folder's own checkpoint, finish the bookkeeping of its epoch that a kill may have cut short
        after ``last`` was written: the numbered checkpoint and ``model_best``, copied from the checkpoint itself."""
        if not self.load_state_dict_from_checkpoint(checkpoint_path):
            return
        if os.path.dirname(os.path.abspath(checkpoint_path)) != os.path.abspath(self.checkpoint_dir):
            return
        epoch, metric = load_checkpoint_metadata(checkpoint_path)['saver'].get('pending', (None, None))
        if epoch is None:
            return
        save_path = self._checkpoint_path(epoch)
        if save_path not in [f for f, _ in self.checkpoint_files]:
            worst = self.checkpoint_files[-1] if self.checkpoint_files else None
            if (len(self.checkpoint_files) < self.max_history or worst[1] is None
                    or (metric is not None and self.cmp(metric, worst[1]))):
                if len(self.checkpoint_files) >= self.max_history:
                    self._cleanup_checkpoints(1)
                self._duplicate(checkpoint_path, save_path)
                self._track_checkpoint(save_path, epoch, metric, update_best_file=False)
                _logger.info(f'Completed the bookkeeping of epoch {epoch}: {save_path}')
        best_path = os.path.join(self.checkpoint_dir, 'model_best' + self.extension)
        best_is_stale = not os.path.exists(best_path) or load_checkpoint_metadata(best_path).get('epoch') != epoch
        if self.best_epoch == epoch and best_is_stale:
            self._duplicate(checkpoint_path, best_path)
            _logger.info(f'Completed the bookkeeping of epoch {epoch}: {best_path}')

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

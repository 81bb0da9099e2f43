"""Atomic file output: write to a temporary file beside the target, then rename."""

import errno
import os
import re
import shutil
import tempfile

_SUFFIX = ".sparsecore-tmp"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(directory, base):
    """Remove the temporary files of ``base`` that killed writers left (their
    process is gone); a live writer's are left alone. A previous output that a
    killed writer had moved aside (``.old.``) is put back when nothing took its
    place, else removed. Returns the removed paths."""
    pattern = re.compile(re.escape(f".{base}.") + r"(\d+)\.(old\.)?[^.]+" + re.escape(_SUFFIX) + "$")
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    target = os.path.join(directory, base)
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            path = os.path.join(directory, name)
            try:
                if m.group(2) and not os.path.lexists(target):
                    os.rename(path, target)  # killed between moving the old output aside and renaming the new
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def remove_stale(dst):
    """What killed writers of ``dst`` left beside it: temporaries removed, an old output they had moved aside
    put back where nothing replaced it (see :class:`AtomicPath`, :class:`AtomicDir`)."""
    dst = os.fspath(dst).rstrip(os.sep) or os.sep
    return _remove_stale(os.path.dirname(os.path.abspath(dst)), os.path.basename(dst))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists_error(dst):
    return FileExistsError(errno.EEXIST, f"{dst}: exists (written by another run meanwhile); pass --force "
                                         f"(force=True) to replace it")


class AtomicPath:
    """``with AtomicPath(dst) as tmp:`` write ``tmp``; on success it is fsynced
    (unless ``sync=False``), given the mode a plain write would (0666 less the
    umask) and renamed onto ``dst``, on an error removed. An interrupted or
    killed writer never leaves a partial ``dst``; the temporary files a killed
    writer left (named with its process id) are removed by the next write to
    the same target. ``replace=False``: a ``dst`` that another writer made
    meanwhile is never replaced (the output is linked into place, which fails
    when the name is taken)."""

    def __init__(self, dst, sync=True, replace=True):
        self.dst = os.fspath(dst)
        self.sync = sync
        self.replace = replace

    def __enter__(self):
        d = os.path.dirname(os.path.abspath(self.dst))
        base = os.path.basename(self.dst)
        _remove_stale(d, base)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=_SUFFIX, dir=d)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600
            if self.sync:  # the data is on disk before the name points at it
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
            self._place()
            if self.sync:
                dfd = os.open(os.path.dirname(os.path.abspath(self.dst)), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        else:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
        return False

    def _place(self):
        if self.replace:
            os.replace(self.tmp, self.dst)
            return
        try:
            os.link(self.tmp, self.dst)  # atomic, and refuses a name that exists
        except FileExistsError:
            os.unlink(self.tmp)
            raise _exists_error(self.dst) from None
        except OSError as exc:  # a file system without hard links: check, then rename
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                os.unlink(self.tmp)
                raise
            if os.path.lexists(self.dst):
                os.unlink(self.tmp)
                raise _exists_error(self.dst) from None
            os.replace(self.tmp, self.dst)
            return
        os.unlink(self.tmp)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicDir:
    """``with AtomicDir(dst) as tmp:`` fill the folder ``tmp``; on success its
    files are fsynced (unless ``sync=False``), it gets a plain folder's mode
    and is renamed onto ``dst`` (an existing ``dst`` is moved aside first and
    removed after: at no moment does ``dst`` hold a partial output); on an
    error it is removed. Stale temporary folders of killed writers are
    removed by the next write to the same target, as :class:`AtomicPath`
    does for files."""

    def __init__(self, dst, sync=True, replace=True):
        self.dst = os.fspath(dst).rstrip(os.sep) or os.sep
        self.sync = sync
        self.replace = replace

    def __enter__(self):
        d = os.path.dirname(os.path.abspath(self.dst))
        base = os.path.basename(self.dst)
        _remove_stale(d, base)
        self.tmp = tempfile.mkdtemp(prefix=f".{base}.{os.getpid()}.", suffix=_SUFFIX, dir=d)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if self.sync:
            for root, _, files in os.walk(self.tmp):
                for f in files:
                    with open(os.path.join(root, f), "rb+") as fh:
                        os.fsync(fh.fileno())
                _fsync_dir(root)
        aside = None
        if os.path.lexists(self.dst) and not self.replace:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise _exists_error(self.dst)
        if os.path.lexists(self.dst):
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.{os.getpid()}.old.", suffix=_SUFFIX,
                                     dir=os.path.dirname(os.path.abspath(self.dst)))
            os.rmdir(aside)
            os.rename(self.dst, aside)
        try:
            os.rename(self.tmp, self.dst)  # onto a folder another writer made meanwhile: refused (not empty)
        except BaseException:
            if aside is not None:
                os.rename(aside, self.dst)  # put the old one back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if self.sync:
            _fsync_dir(os.path.dirname(os.path.abspath(self.dst)))
        if aside is not None:
            if os.path.islink(aside):  # the old output was a link: the link goes, never what it points at
                os.unlink(aside)
            else:
                shutil.rmtree(aside, ignore_errors=True)
        return False

"""Atomic file output: write to a temporary file beside the target, then rename."""

import os
import re
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
    process is gone); a live writer's are left alone. Returns the removed paths."""
    pattern = re.compile(re.escape(f".{base}.") + r"(\d+)\.[^.]+" + re.escape(_SUFFIX) + "$")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except OSError:
                pass
    return removed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicPath:
    """``with AtomicPath(dst) as tmp:`` write ``tmp``; on success it is fsynced
    (unless ``sync=False``), given the mode a plain write would (0666 less the
    umask) and renamed onto ``dst``, on an error removed. An interrupted or
    killed writer never leaves a partial ``dst``; the temporary files a killed
    writer left (named with its process id) are removed by the next write to
    the same target."""

    def __init__(self, dst, sync=True):
        self.dst = os.fspath(dst)
        self.sync = sync

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
            os.replace(self.tmp, self.dst)
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

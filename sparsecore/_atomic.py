"""Atomic file output: write to a temporary file beside the target, then rename."""

import os
import tempfile


class AtomicPath:
    """``with AtomicPath(dst) as tmp:`` write ``tmp``; on success it is fsynced
    (unless ``sync=False``) and renamed onto ``dst``, on an error removed. An
    interrupted or killed writer never leaves a partial ``dst``."""

    def __init__(self, dst, sync=True):
        self.dst = os.fspath(dst)
        self.sync = sync

    def __enter__(self):
        d = os.path.dirname(os.path.abspath(self.dst))
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.dst)}.", suffix=".sparsecore-tmp", dir=d)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
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

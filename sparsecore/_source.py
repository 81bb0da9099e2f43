"""What selection reads and what it decides: :class:`Source` and :class:`Rule`.

The lowest floor of the engine above the kernels: plain data, shared by the
host code, the device code (``sparsecore/_cuda``) and the public modules,
importing nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._kernels.keys import MODE_ABS, MODE_IDENTITY, MODE_SQUARE, NORM_L1, NORM_L2, NORM_MAX, NORM_NONE

__all__ = ["NORM_KINDS", "NORM_L1", "NORM_L2", "NORM_MAX", "NORM_NONE", "PRUNED_SCORE", "Rule", "Source"]

# Per-tensor score normalisation: the option's name and the kind the norm kernels take.
NORM_KINDS = {"none": NORM_NONE, "l1": NORM_L1, "l2": NORM_L2, "max": NORM_MAX}

# Score given to entries that current masks have already pruned: below every
# finite score, so that a selection takes them first. Real scores at or below
# it (|s| ~ 1.8e308) are lifted one ulp above.
PRUNED_SCORE = -np.finfo(np.float64).max


@dataclass
class Source:
    """One tensor's scores as the kernels read them: a transform of ``data``
    (``mode``: identity, ``|x|`` or ``x²``; then times ``inv`` when ``scaled``).

    ``role`` names the array in error messages ("scores", "weights", ...);
    ``per_unit`` marks scores given one per unit of a :class:`~sparsecore.Units`
    pattern, used as they are; ``original`` is the array errors index into."""

    name: str
    data: np.ndarray  # flat, C-contiguous float32/float64 (or uint8 for a mask)
    shape: tuple
    mode: int = MODE_IDENTITY
    inv: float = 1.0
    scaled: bool = False
    role: str = "scores"
    original: object = None
    per_unit: bool = False

    on_device = False  # a device source (``sparsecore._cuda.select.DeviceSource``) says True

    @property
    def size(self):
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    def needs_wide(self):
        """Whether the keys must be 64-bit (float64 data, or a transform float32 cannot hold exactly)."""
        return self.dtype == np.float64 or self.scaled or self.mode == MODE_SQUARE

    def errors_index(self):
        """The array a non-finite error points into."""
        return self.original if self.original is not None else self.data

    def with_pruned(self, keep):
        """``(source, count)``: a float64 copy of the transformed scores in
        which the entries ``keep`` (a flat bool mask of current masks) drops
        score below every other, and how many it drops."""
        x = self.data.astype(np.float64)
        if self.mode == MODE_ABS:
            np.abs(x, out=x)
        elif self.mode == MODE_SQUARE:
            np.multiply(x, x, out=x)
        if self.scaled:
            x *= self.inv
        np.maximum(x, np.nextafter(PRUNED_SCORE, 0.0), out=x)
        x[~keep] = PRUNED_SCORE
        out = Source(self.name, x, self.shape, MODE_IDENTITY, role=self.role, original=self.original)
        return out, int(keep.size - np.count_nonzero(keep))


class Rule(NamedTuple):
    """Prune where key < ``key``, and the first ``quota`` entries with key == ``key``.

    A named tuple, not a frozen dataclass: a global selection makes one per
    tensor, and a file may hold 100,000 (a tuple is made in a third of the time)."""

    key: int
    quota: int
    wide: bool

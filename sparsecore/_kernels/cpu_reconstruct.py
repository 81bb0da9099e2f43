"""The column sweep of SparseGPT (Optimal Brain Surgeon with a Cholesky
factor of the inverse Hessian) within one block of columns.

Numba rather than a BLAS rank-1 update per column: a column block holds at
most a few hundred columns, and a BLAS call per column spends more time in
Python and in waking BLAS threads than in arithmetic.
"""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def sweep_block(W1, U1, chosen, E1, group_start, keep_n, m):
    """Sweep the columns of ``W1`` (rows, b; column-major) in place.

    ``U1`` (b, b): the block's part of the upper Cholesky factor of ``H⁻¹``.
    ``chosen`` (rows, b; bool, True = pruned): read, or, when ``m > 0``,
    filled per row at each group of ``m`` columns (those whose index
    ``group_start + i`` is a multiple of ``m``; the group cut at the block's
    end): its ``m - keep_n`` lowest ``w² / U1ᵢᵢ²``, ties to the lower column.
    Each column's pruned weights go to zero and their error, divided by
    ``U1ᵢᵢ``, lands in ``E1`` and spreads over the columns to its right.
    """
    rows, b = W1.shape
    for i in range(b):
        if m > 0 and (group_start + i) % m == 0:
            width = min(m, b - i)
            drop = min(m - keep_n, width)
            for r in range(rows):
                for _ in range(drop):
                    best, best_s = -1, np.inf
                    for c in range(i, i + width):
                        if not chosen[r, c]:
                            s = W1[r, c] * W1[r, c] / (U1[c, c] * U1[c, c])
                            if best < 0 or s < best_s:
                                best, best_s = c, s
                    chosen[r, best] = True
        inv = 1.0 / U1[i, i]
        for r in range(rows):
            w = W1[r, i]
            q = 0.0 if chosen[r, i] else w
            E1[r, i] = (w - q) * inv
            W1[r, i] = q
        for c in range(i + 1, b):
            u = U1[i, c]
            if u != 0.0:
                for r in range(rows):
                    W1[r, c] -= E1[r, i] * u


_TILE = 64  # square tiles of the transposing copies below: both sides stay in cache


@njit(cache=True, nogil=True)
def symmetric_from_upper(upper):
    """A new C-ordered symmetric matrix from the upper triangle of ``upper``
    (Fortran-ordered, as the Hessian sums are kept), tile by tile: one pass
    where ``np.triu(u) + np.triu(u, 1).T`` takes three."""
    n = upper.shape[0]
    out = np.empty((n, n), np.float64)
    for j0 in range(0, n, _TILE):
        for i0 in range(0, j0 + 1, _TILE):  # the tile (i0.., j0..) of the upper triangle, and its mirror
            for j in range(j0, min(j0 + _TILE, n)):
                for i in range(i0, min(i0 + _TILE, j + 1)):
                    out[j, i] = upper[i, j]
            for i in range(i0, min(i0 + _TILE, n)):
                for j in range(max(j0, i), min(j0 + _TILE, n)):
                    out[i, j] = upper[i, j]
    return out


@njit(cache=True, nogil=True)
def damped_reversed(upper, damp):
    """The lower triangle of ``J (H + λI) J``, Fortran-ordered, ready for
    LAPACK's Cholesky (``lower=1``: the strict upper triangle of the result
    is left unwritten, and potrf does not read it). ``upper``: Fortran-ordered,
    its upper triangle holds ``H`` (an accumulator's sum as kept, or the
    transpose of a C-ordered symmetric ``H``); nothing below its diagonal is
    read. ``J`` reverses the order of the inputs; ``λ = damp ·`` the mean
    diagonal; a dead input (zero diagonal) is made independent of the others
    (its row and column zero, its diagonal 1, before damping). Returns the
    matrix and the dead inputs."""
    n = upper.shape[0]
    dead = np.empty(n, np.bool_)
    total = 0.0
    for i in range(n):
        dead[i] = upper[i, i] == 0.0
        total += 1.0 if dead[i] else upper[i, i]
    lam = damp * total / n if n else 0.0
    out = np.empty((n, n), np.float64).T  # Fortran order: out[:, j] contiguous
    for j in range(n):
        b = n - 1 - j
        out[j, j] = (1.0 if dead[b] else upper[b, b]) + lam
        for i in range(j + 1, n):  # below the diagonal: column b of the upper triangle, read backwards
            a = n - 1 - i
            out[i, j] = 0.0 if dead[a] or dead[b] else upper[a, b]
    return out, dead


@njit(cache=True, nogil=True)
def reverse(flat):
    """Reverse a 1-D array in place: a Fortran-ordered matrix read backwards
    is the matrix with both its axes reversed, without a second copy."""
    n = flat.size
    for i in range(n // 2):
        t = flat[i]
        flat[i] = flat[n - 1 - i]
        flat[n - 1 - i] = t

"""Coupled groups in the engine: slices of several tensors kept or removed together by ``prune(groups=)``
and cut out by ``shrink(groups=)``; the smaller arrays compute what the masked ones do."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecore as sc


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _mlp(W, x):
    return (_silu(x @ W["gate"].T) * (x @ W["up"].T)) @ W["down"].T


def _gqa(W, x, heads, kv, dh):
    """Grouped-query attention of one sequence x (T, D): query head h reads k/v head h // (heads // kv)."""
    q = (x @ W["q"].T).reshape(len(x), heads, dh)
    k = (x @ W["k"].T).reshape(len(x), kv, dh)
    v = (x @ W["v"].T).reshape(len(x), kv, dh)
    r = heads // kv
    out = np.empty_like(q)
    for h in range(heads):
        a = q[:, h] @ k[:, h // r].T / np.sqrt(dh)
        a = np.exp(a - a.max(axis=1, keepdims=True))
        out[:, h] = (a / a.sum(axis=1, keepdims=True)) @ v[:, h // r]
    return out.reshape(len(x), heads * dh) @ W["o"].T


def _masked(W, masks):
    return {n: (w * masks[n] if n in masks else w) for n, w in W.items()}


def test_an_mlp_group_prunes_and_shrinks_to_what_the_masked_mlp_computes(rng):
    D, F = 6, 16
    W = {"gate": rng.standard_normal((F, D)), "up": rng.standard_normal((F, D)), "down": rng.standard_normal((D, F)),
         "norm": rng.standard_normal(D)}
    g = sc.Group("mlp", [("gate", 0), ("up", 0), ("down", 1)], units=F)
    r = sc.prune(W, groups=[g], sparsity=0.25)
    keep = r.groups["mlp"]
    assert keep.sum() == 12 and r.ignored == ["norm"] and sorted(r.masks) == ["down", "gate", "up"]
    want = np.sqrt((W["gate"] ** 2).sum(1) + (W["up"] ** 2).sum(1) + (W["down"] ** 2).sum(0))  # l2 of |w|
    assert set(np.flatnonzero(~keep)) == set(np.argsort(want, kind="stable")[:4])
    np.testing.assert_array_equal(r.masks["down"], np.broadcast_to(keep, (D, F)))
    small = sc.shrink(W, r.groups, groups=[g])
    assert small["gate"].shape == (12, D) and small["down"].shape == (D, 12) and small["norm"].shape == (D,)
    x = rng.standard_normal((5, D))
    np.testing.assert_allclose(_mlp(small, x), _mlp(_masked(W, r.masks), x), rtol=1e-12, atol=1e-12)
    assert all(not np.shares_memory(small[n], W[n]) for n in W)


@pytest.mark.parametrize("heads, kv", [(4, 4), (8, 2), (6, 1)])
def test_gqa_heads_go_with_their_kv_head_and_o_proj_columns(rng, heads, kv):
    """A k/v head's group: its k and v rows, the rows of the query heads that read it, and their o columns."""
    D, dh = 8, 4
    W = {"q": rng.standard_normal((heads * dh, D)), "k": rng.standard_normal((kv * dh, D)),
         "v": rng.standard_normal((kv * dh, D)), "o": rng.standard_normal((D, heads * dh))}
    g = sc.Group("attn", [("q", 0), ("k", 0), ("v", 0), ("o", 1)], units=kv)
    x = rng.standard_normal((7, D))
    if kv == 1:  # nothing may go: min_keep=1
        with pytest.raises(ValueError, match="group 'attn' would keep 0 of its 1 units, fewer than its min_keep=1"):
            sc.prune(W, groups=[g], sparsity=1.0)
        return
    r = sc.prune(W, groups=[g], sparsity=0.5, scope="local")
    assert r.groups["attn"].sum() == kv // 2
    small = sc.shrink(W, r.groups, groups=[g])
    assert small["q"].shape == (heads // 2 * dh, D) and small["k"].shape == (kv // 2 * dh, D)
    np.testing.assert_allclose(_gqa(small, x, heads // 2, kv // 2, dh), _gqa(_masked(W, r.masks), x, heads, kv, dh),
                               rtol=1e-10, atol=1e-12)


def test_a_residual_stream_channel_runs_through_every_block_and_tensors_shared_by_groups_intersect(rng):
    """Channel c of the residual stream: the embedding's column, each block's input columns and output rows, the
    head's columns; the blocks' hidden units are groups of their own, so each block's tensors sit in two groups."""
    D, F, blocks = 8, 12, 2
    W = {"embed": rng.standard_normal((10, D)), "head": rng.standard_normal((3, D))}
    for b in range(blocks):
        W[f"w{b}"] = rng.standard_normal((F, D))
        W[f"u{b}"] = rng.standard_normal((D, F))
    stream = sc.Group("stream", [("embed", 1), ("head", 1)] + [(f"w{b}", 1) for b in range(blocks)]
                      + [(f"u{b}", 0) for b in range(blocks)], units=D)
    hidden = [sc.Group(f"h{b}", [(f"w{b}", 0), (f"u{b}", 1)], units=F) for b in range(blocks)]

    def run(W, ids):
        h = W["embed"][ids]
        for b in range(blocks):
            h = h + np.maximum(h @ W[f"w{b}"].T, 0.0) @ W[f"u{b}"].T
        return h @ W["head"].T

    r = sc.prune(W, groups=[stream, *hidden], sparsity=0.5, scope="global", max_sparsity=0.75)
    for b in range(blocks):  # the intersection: a removed stream channel's column and a removed hidden unit's row
        want = np.outer(r.groups[f"h{b}"], r.groups["stream"])
        np.testing.assert_array_equal(r.masks[f"w{b}"], want)
    kept = sum(int(k.sum()) for k in r.groups.values())
    assert kept == round(0.5 * (D + blocks * F))  # global: half of all units
    assert all(k.sum() >= 0.25 * k.size for k in r.groups.values())  # the caps hold per group
    small = sc.shrink(W, r.groups, groups=[stream, *hidden])
    ids = rng.integers(0, 10, 6)
    np.testing.assert_allclose(run(small, ids), run(_masked(W, r.masks), ids), rtol=1e-12, atol=1e-12)


def test_group_scores_reduce_any_criterion_over_every_member(rng):
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((2, 3, 4))
    idx = np.array([[0, 5], [2, 3], [1, 4]])  # unit u owns rows idx[u] of a
    g = sc.Group("g", [("a", 0, idx), ("b", 1)], units=3)
    for reduce, f in [("l1", lambda z: np.abs(z).sum()), ("l2", lambda z: np.sqrt((z ** 2).sum())),
                      ("mean", np.mean), ("max", np.max)]:
        want = [f(np.concatenate([a[idx[u]].ravel(), b[:, u].ravel()])) for u in range(3)]
        np.testing.assert_allclose(sc.group_scores(g, {"a": a, "b": b}, reduce=reduce), want, rtol=1e-12)
    np.testing.assert_allclose(sc.group_scores(g, {"b": b}, reduce="l1"), np.abs(b).sum(axis=(0, 2)))  # a unscored
    with pytest.raises(ValueError, match="no scores for any member of group 'g'"):
        sc.group_scores(g, {"c": a})
    # a criterion's scores (a callable of the user's), or one score per unit given directly
    r = sc.prune({"a": a, "b": b}, lambda w, s: w ** 2, groups=[g], sparsity=1 / 3)
    sq = sc.group_scores(g, {"a": a ** 2, "b": b ** 2})
    assert not r.groups["g"][np.argmin(sq)] and r.groups["g"].sum() == 2
    r = sc.prune({"a": a, "b": b}, {"g": np.array([3.0, 1.0, 2.0])}, groups=[g], sparsity=1 / 3)
    np.testing.assert_array_equal(r.groups["g"], [True, False, True])


def test_refusals_name_the_group_the_tensor_and_the_rule(rng):
    W = {"a": rng.standard_normal((6, 4)), "b": rng.standard_normal((4, 6))}
    cases = [
        (lambda: sc.Group("g", [("a", 0)]), "group 'g': units must be a positive integer"),
        (lambda: sc.Group("g", [("a", 0), ("a", 0)], units=2), "group 'g' names a tensor axis twice"),
        (lambda: sc.Group("g", [("a", 0)], units=2, reduce="sum"), "reduce must be one of"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("a", 0)], units=4)], sparsity=0.5),
         "group 'g': tensor 'a' has 6 entries along axis 0, not a multiple of the group's 4 units"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("c", 0)], units=2)], sparsity=0.5),
         "group 'g' names tensor 'c', which is not among the weights"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("a", 0, np.array([[0, 1], [1, 2]]))])], sparsity=0.5),
         "group 'g': the index of tensor 'a' owns an entry twice"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("a", 2)], units=2)], sparsity=0.5),
         "group 'g': axis 2 of tensor 'a' is out of range for its shape \\(6, 4\\)"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("a", 0, np.array([0, 9]))])], sparsity=0.5),
         "the index of tensor 'a' reaches outside axis 0 \\(6 entries\\): 0..9"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("a", 0)], units=2)], pattern="2:4"),
         "pattern=, masks=, column_block= and ignore= do not combine with it"),
        (lambda: sc.prune(W, {"g": np.ones(3)}, groups=[sc.Group("g", [("a", 0)], units=2)], sparsity=0.5),
         "scores of group 'g' must hold one per unit \\(2,\\), got shape \\(3,\\)"),
        (lambda: sc.prune(W, groups=[sc.Group("g", [("a", 0)], units=2)], sparsity=0.5, scope="row"),
         "scope with groups must be 'local' or 'global', got 'row'"),
        (lambda: sc.shrink(W, {"h": np.ones(2, bool)}, groups=[sc.Group("g", [("a", 0)], units=2)]),
         "keep names unknown groups \\['h'\\]"),
        (lambda: sc.shrink(W, {"g": np.zeros(2, bool)}, groups=[sc.Group("g", [("a", 0)], units=2)]),
         "keep for group 'g' keeps 0 of its 2 units"),
    ]
    for make, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make()


def test_a_global_selection_never_empties_a_group(rng):
    """Scores a thousand times smaller in one group: the global ranking takes them first, the cap stops it at
    min_keep units."""
    W = {"a": rng.standard_normal((4, 3)) * 1e-3, "b": rng.standard_normal((8, 3))}
    ga, gb = sc.Group("ga", [("a", 0)], units=4, min_keep=2), sc.Group("gb", [("b", 0)], units=8)
    r = sc.prune(W, groups=[ga, gb], sparsity=0.75, scope="global")
    assert r.groups["ga"].sum() == 2 and r.groups["gb"].sum() == 1
    assert r.summary[0].name in ("a", "b") and {s.name for s in r.summary} == {"a", "b"}


@settings(max_examples=40, deadline=None)
@given(units=st.integers(1, 6), widths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 31 - 1), frac=st.floats(0, 1))
def test_prune_then_shrink_removes_exactly_the_units_entries(units, widths, seed, frac):
    rng = np.random.default_rng(seed)
    W = {f"t{j}": rng.standard_normal((units * w, 3) if j % 2 == 0 else (2, units * w)) for j, w in enumerate(widths)}
    g = sc.Group("g", [(f"t{j}", 0 if j % 2 == 0 else 1) for j in range(len(widths))], units=units, min_keep=0)
    r = sc.prune(W, groups=[g], sparsity=frac)
    keep = r.groups["g"]
    assert keep.sum() == units - round(frac * units)
    if not keep.any():
        return
    small = sc.shrink(W, r.groups, groups=[g])
    for j, w in enumerate(widths):
        n, axis = f"t{j}", j % 2
        kept = np.repeat(keep, w)  # unit u owns w consecutive entries
        np.testing.assert_array_equal(small[n], np.compress(kept, W[n], axis=axis))
        np.testing.assert_array_equal(r.masks[n], np.broadcast_to(np.expand_dims(kept, 1 - axis), W[n].shape))

"""Whole attention heads and MLP channels of Hugging Face transformers:
the coupled groups found from the model, and their removal into a smaller
dense model of the same classes.

The layouts read (from the modules, checked against the config):

- decoder attention (Llama, Qwen2, Mistral and their kind: ``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj`` and a ``head_dim``): one unit per
  key/value head, with the query heads that read it under grouped-query
  attention: their rows of q, k, v (and biases) and their columns of o;
- encoder attention (BERT, MiniLM: ``self.query``/``key``/``value`` and
  ``output.dense``): one unit per head;
- decoder MLP (``gate_proj``, ``up_proj``, ``down_proj``) and encoder MLP
  (``intermediate.dense``, ``output.dense``): one unit per channel, its row
  of gate and up (the intermediate layer) and its column of down (output).

The groups are the engine's (:class:`sparsecore.Group`): any criterion
scores them and :func:`sparsecore.prune` selects units (``groups=``);
:func:`remove_units` then cuts them out. A decoder whose layers keep the
same counts is written by ``save_pretrained`` and loaded back by a plain
``from_pretrained``: the config gets the new head and channel counts (and
its ``head_dim``, which no longer follows from them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

import sparsecore as sc

from . import torch as sct

__all__ = ["consumer", "fluctuation_scores", "input_stats", "prune_units", "remove_units", "save_check", "unit_groups"]

UNITS = ("heads", "channels")


def _linears(module, *names):
    """The children ``names`` (dotted) of ``module`` if every one is an ``nn.Linear``, else None."""
    out = []
    for n in names:
        m = module
        for part in n.split("."):
            m = getattr(m, part, None)
        if not isinstance(m, nn.Linear):
            return None
        out.append(m)
    return out


def _members(prefix, rows, cols):
    """Group members: each linear's weight (and bias) along its outputs in ``rows``, weight inputs in ``cols``."""
    out = []
    for name, lin in rows:
        out.append((f"{prefix}{name}.weight", 0))
        if lin.bias is not None:
            out.append((f"{prefix}{name}.bias", 0))
    out += [(f"{prefix}{name}.weight", 1) for name, _ in cols]
    return out


def unit_groups(model: nn.Module, units: Iterable[str] = UNITS, *, reduce: str = "l2") -> list[sc.Group]:
    """The coupled groups of ``model``'s attention heads (``"heads"``) and MLP
    channels (``"channels"``), one group per attention and per MLP, named
    after the module (``model.layers.0.self_attn``), members named as
    ``model.named_parameters()`` names them; ``reduce`` combines a unit's
    entry scores (:class:`sparsecore.Group`).

    Raises ``ValueError`` naming the model's class when none of the layouts
    above is found, and naming the module when an attention's projections
    do not split into its heads."""
    units = [units] if isinstance(units, str) else list(units)
    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        raise ValueError(f"units must name some of {list(UNITS)}, got {units!r}")
    groups = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if "heads" in units:
            dec = _linears(mod, "q_proj", "k_proj", "v_proj", "o_proj")
            enc = _linears(mod, "self.query", "self.key", "self.value", "output.dense")
            if dec is not None:
                head_dim = getattr(mod, "head_dim", None)
                q, k, v, o = dec
                names = ("q_proj", "k_proj", "v_proj", "o_proj")
            elif enc is not None:
                head_dim = getattr(mod.self, "attention_head_size", None)
                q, k, v, o = enc
                names = ("self.query", "self.key", "self.value", "output.dense")
            if dec is not None or enc is not None:
                if not isinstance(head_dim, int) or head_dim < 1 or q.out_features % head_dim \
                        or k.out_features % head_dim or v.out_features != k.out_features \
                        or o.in_features != q.out_features:
                    raise ValueError(f"attention {name!r} ({type(mod).__name__}): its projections (q {q.out_features}"
                                     f", k {k.out_features}, v {v.out_features} outputs, o {o.in_features} inputs) "
                                     f"do not split into heads of head_dim {head_dim}")
                kv = k.out_features // head_dim
                if (q.out_features // head_dim) % kv:
                    raise ValueError(f"attention {name!r}: {q.out_features // head_dim} query heads do not share "
                                     f"{kv} key/value heads evenly")
                groups.append(sc.Group(name, _members(prefix, zip(names[:3], (q, k, v)), [(names[3], o)]),
                                       units=kv, reduce=reduce))
                continue
        if "channels" in units:
            dec = _linears(mod, "gate_proj", "up_proj", "down_proj")
            enc = _linears(mod, "intermediate.dense", "output.dense") if hasattr(mod, "attention") else None
            if dec is not None:
                rows, cols = [("gate_proj", dec[0]), ("up_proj", dec[1])], [("down_proj", dec[2])]
            elif enc is not None:
                rows, cols = [("intermediate.dense", enc[0])], [("output.dense", enc[1])]
            if dec is not None or enc is not None:
                groups.append(sc.Group(name if dec is not None else f"{prefix}intermediate",
                                       _members(prefix, rows, cols), units=rows[0][1].out_features, reduce=reduce))
    if not groups:
        raise ValueError(f"{type(model).__name__}: no attention or MLP of a layout sparsecore reads (decoder "
                         f"q_proj/k_proj/v_proj/o_proj and gate_proj/up_proj/down_proj, encoder self.query/key/value "
                         f"and intermediate.dense/output.dense); nothing to group")
    return groups


def _index(t, axis, idx):
    return t.detach().index_select(axis, torch.as_tensor(idx, device=t.device)).clone()


def remove_units(model: nn.Module, keep: Mapping[str, np.ndarray], groups: Iterable[sc.Group], *,
                 config: bool = True) -> dict:
    """Cut the units ``keep`` removes (group name -> bool per unit, True =
    kept; ``PruneResult.groups``) out of ``model``, in place: every member
    linear replaced by a smaller one of the same dtype and device, the
    attention modules' head counts and the config updated. Everything is
    computed and checked before the model is touched: a refusal leaves it
    as it was.

    Returns ``{group name: units kept}``. The config gets the new counts
    where every layer keeps the same (``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``intermediate_size``), so that
    ``save_pretrained`` then ``from_pretrained`` gives this model back; with
    counts that differ by layer the model runs, but a stock config cannot
    describe it (``ValueError`` from :func:`save_check` says so). ``config=False``
    leaves the config alone (a caller cutting a model in parts sets it once).
    """
    groups = list(groups)
    params = dict(model.named_parameters())
    members = {t for g in groups for t in g.tensors()}
    missing = sorted(members - params.keys())
    if missing:
        raise ValueError(f"the groups name {missing[0]!r}, which is not a parameter of {type(model).__name__}")
    mods = dict(model.named_modules())
    for t in sorted(members):
        mname, _, pname = t.rpartition(".")
        if not isinstance(mods.get(mname), nn.Linear) or pname not in ("weight", "bias"):
            raise ValueError(f"the groups name {t!r}, which is not the weight or bias of an nn.Linear "
                             f"({type(mods.get(mname)).__name__}); remove_units cuts linear layers only")
    shapes = {n: tuple(params[n].shape) for n in members}
    kept = sc.kept_entries(groups, keep, shapes)  # refuses unknown groups and emptied ones
    new = {}  # linear module name -> replacement
    for (t, axis), idx in kept.items():
        mname = t.rsplit(".", 1)[0]
        lin = new.get(mname) or mods[mname]
        w = lin.weight if t.endswith(".weight") else lin.bias
        cut = _index(w, axis, idx)
        if mname not in new:
            new[mname] = lin = _copy_linear(lin)
        if t.endswith(".weight"):
            lin.weight = nn.Parameter(cut, requires_grad=w.requires_grad)
            lin.in_features, lin.out_features = cut.shape[1], cut.shape[0]
        else:
            lin.bias = nn.Parameter(cut, requires_grad=w.requires_grad)
    counts = {}
    for g in groups:
        k = np.asarray(keep.get(g.name, np.ones(g.units, np.bool_)))
        counts[g.name] = int(k.sum())
    for mname, lin in new.items():  # the model changes only now
        parent, _, child = mname.rpartition(".")
        setattr(mods[parent] if parent else model, child, lin)
    if config:
        _update_counts(model, groups, counts)
    return counts


def _copy_linear(lin):
    out = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = lin.in_features, lin.out_features
    out.weight, out.bias = lin.weight, lin.bias
    out.train(lin.training)
    return out


def _update_counts(model, groups, counts):
    """Head counts of the attention modules, and the config's counts where every layer agrees."""
    mods = dict(model.named_modules())
    config = getattr(model, "config", None)
    heads, kv_heads, channels, head_dims = set(), set(), set(), set()
    for g in groups:
        mod = mods.get(g.name)
        if isinstance(getattr(mod, "q_proj", None), nn.Linear):
            hd = mod.head_dim
            heads.add(mod.q_proj.out_features // hd)
            kv_heads.add(mod.k_proj.out_features // hd)
            head_dims.add(hd)
        elif isinstance(getattr(getattr(mod, "self", None), "query", None), nn.Linear):
            s = mod.self
            s.num_attention_heads = s.query.out_features // s.attention_head_size
            s.all_head_size = s.query.out_features
            heads.add(s.num_attention_heads)
            head_dims.add(s.attention_head_size)
        else:
            channels.add(counts[g.name])
    if config is None:
        return
    if len(heads) == 1 and len(kv_heads) == 1 and hasattr(config, "num_key_value_heads"):
        config.head_dim = head_dims.pop()
        config.num_attention_heads, config.num_key_value_heads = heads.pop(), kv_heads.pop()
    if len(channels) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = channels.pop()


def save_check(model: nn.Module) -> None:
    """Refuses (``ValueError``) a model whose config does not describe its
    shapes, before ``save_pretrained`` writes a folder that
    ``from_pretrained`` cannot load: counts of heads or channels that
    differ by layer, or encoder heads (a BERT config derives the head size
    from the head count, so it cannot hold fewer heads)."""
    config = model.config
    for name, mod in model.named_modules():
        q = getattr(mod, "q_proj", None)
        if isinstance(q, nn.Linear) and hasattr(config, "num_attention_heads"):
            if q.out_features != config.num_attention_heads * mod.head_dim \
                    or mod.k_proj.out_features != config.num_key_value_heads * mod.head_dim:
                raise ValueError(f"{name}: {q.out_features // mod.head_dim} query and "
                                 f"{mod.k_proj.out_features // mod.head_dim} key/value heads, but the config says "
                                 f"{config.num_attention_heads} and {config.num_key_value_heads}: the layers keep "
                                 f"different head counts, which a stock config cannot describe (select with "
                                 f"scope='local' for the same count in every layer)")
        s = getattr(mod, "self", None)
        if isinstance(getattr(s, "query", None), nn.Linear) and s.num_attention_heads != config.num_attention_heads:
            raise ValueError(f"{name}: {s.num_attention_heads} heads of the config's {config.num_attention_heads}: "
                             f"a {type(config).__name__} derives the head size from the head count, so it cannot "
                             f"describe removed heads; keep the heads (units='channels') to save with "
                             f"save_pretrained")
        for lin in (getattr(mod, "gate_proj", None), getattr(getattr(mod, "intermediate", None), "dense", None)):
            if isinstance(lin, nn.Linear) and lin.out_features != getattr(config, "intermediate_size",
                                                                          lin.out_features):
                raise ValueError(f"{name}: {lin.out_features} MLP channels, but the config says "
                                 f"{config.intermediate_size}: the layers keep different counts, which a stock "
                                 f"config cannot describe (select with scope='local')")


def consumer(group):
    """The linear whose inputs a group's units are (its member along axis 1): o_proj, down_proj, output.dense."""
    return next(t for t, axis, _ in group.members if axis == 1).rsplit(".", 1)[0]


class _InputSums:
    """Forward pre-hooks summing ``x xᵀ`` and ``x`` of some linears' inputs (float64, padding left out
    where ``mask`` is set to the running batch's 2-D padding mask, ``adapters.torch._token_mask``'s)."""

    def __init__(self, mods):
        self.sums = {n: [None, None, 0] for n in mods}
        self.mask = None
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in mods.items()]

    def _hook(self, name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if self.mask is not None and self.mask.size == x.shape[0]:
                x = x[torch.as_tensor(self.mask.reshape(-1), device=x.device)]
            x = x.double()
            acc = self.sums[name]
            if acc[0] is None:
                acc[0] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                acc[1] = torch.zeros(x.shape[1], dtype=torch.float64)
            acc[0] += (x.T @ x).cpu()
            acc[1] += x.sum(0).cpu()
            acc[2] += x.shape[0]
        return pre

    def remove(self):
        for h in self.handles:
            h.remove()

    def result(self):
        """``{name: (E[x xᵀ], E[x], tokens)}``."""
        out = {}
        for n, (h, s_, count) in self.sums.items():
            if not count:
                raise ValueError(f"no calibration tokens reached {n!r}; give data that runs through the model")
            out[n] = ((h / count).numpy(), (s_ / count).numpy(), count)
        return out


def input_stats(model: nn.Module, data: Iterable, linears: Iterable[str], *, max_batches: int | None = None
                ) -> dict:
    """``{linear name: (E[x xᵀ], E[x], tokens)}`` of the inputs of ``linears`` over ``data`` (batches of
    token ids, or dicts of model inputs; a batch's ``attention_mask`` leaves its padding out), float64,
    in one pass of the model as it is."""
    sums = _InputSums({n: model.get_submodule(n) for n in linears})
    try:
        with torch.no_grad():
            for batch in sct._calibration(data, max_batches):
                sums.mask = sct._token_mask(batch)
                sct._forward(model, batch)
    finally:
        sums.remove()
    return sums.result()


def fluctuation_scores(groups: Iterable[sc.Group], model: nn.Module, stats: Mapping) -> dict:
    """FLAP's score of each unit as element scores of its consumer's weight, ``W[:, j]² · Var(x_j)`` (its
    inputs' fluctuation around their mean, weighted by what they feed): summed over a unit's entries
    (``reduce="l1"``), how much of the output's variance the unit carries."""
    params = dict(model.named_parameters())
    out = {}
    for g in groups:
        c = consumer(g)
        h, mu, count = stats[c]
        var = np.maximum(np.diag(h) - mu * mu, 0.0) * count / max(count - 1, 1)
        w = params[f"{c}.weight"].detach().double().cpu().numpy()
        out[f"{c}.weight"] = np.square(w) * var[None, :]
    return out


def _with_bias(model, lin_name, shift):
    """Adds ``shift`` to a linear's bias (made, zero, where it had none)."""
    lin = model.get_submodule(lin_name)
    b = torch.as_tensor(shift, dtype=lin.weight.dtype, device=lin.weight.device)
    if lin.bias is None:
        lin.bias = nn.Parameter(b.clone())
    else:
        with torch.no_grad():
            lin.bias.add_(b)


def _stock_biases(model):
    """Zero biases on every projection a config's ``attention_bias`` / ``mlp_bias`` gives one, where a
    repair gave some of them one (so that the config describes the model: a Llama's flags cover q, k, v, o
    and gate, up, down together)."""
    config = getattr(model, "config", None)
    for flag, names in (("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))):
        mods = [m for _, m in model.named_modules() if all(isinstance(getattr(m, n, None), nn.Linear) for n in names)]
        if not any(getattr(m, n).bias is not None for m in mods for n in names):
            continue
        for m in mods:
            for n in names:
                lin = getattr(m, n)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
        if config is not None and hasattr(config, flag):
            setattr(config, flag, True)


SCORES = ("magnitude", "fluctuation")
REPAIRS = ("none", "bias", "refit", "refit+bias")


def prune_units(model: nn.Module, sparsity, *, units: Iterable[str] = UNITS, scope: str = "local",
                score: str = "magnitude", scores: Mapping[str, np.ndarray] | None = None, data=None,
                repair: str = "none", order: str = "model", multiple: int = 1, max_sparsity: float | None = None,
                damp: float = 0.01, max_batches: int | None = None, stats: Mapping | None = None) -> dict:
    """Remove the fraction ``sparsity`` of ``model``'s heads and channels
    (:func:`unit_groups`): a float, or ``{"heads": a, "channels": b}``.

    Parameters
    ----------
    score : {"magnitude", "fluctuation"}
        The weights' magnitudes over each unit's entries, or FLAP's
        fluctuation of the unit's inputs to its consumer (needs ``data``);
        ``scores`` (element scores by parameter name, any criterion's)
        replace either.
    scope : {"local", "global"}
        The same count in every layer (what a stock config can describe), or
        ranked across layers (``max_sparsity`` per group) by each group's unit
        scores made z-scores (FLAP's standardisation), the total the same;
        counts then differ by layer: the model runs, ``save_check`` refuses it.
    data : iterable of batches, optional
        Calibration batches (token ids, or dicts of model inputs), for the
        fluctuation score and the repair.
    repair : {"none", "bias", "refit", "refit+bias"}
        How each consumer (o_proj, down_proj) is repaired from its inputs'
        statistics (:func:`sparsecore.refit_inputs`): FLAP's bias
        compensation, the least-squares refit of its kept columns, or both
        fitted together. A bias makes the config's ``attention_bias`` /
        ``mlp_bias`` true (zero biases on the other projections).
    order : {"model", "block"}
        ``"model"``: every statistic from one pass of the dense model.
        ``"block"`` (local scope, needs ``data``): block by block, each
        block's attention and then its MLP scored and repaired on the inputs
        the blocks already cut give it (the pruned stream, as
        :func:`sparsecore.prune_sequential` does for weights).
    multiple : int
        With ``scope="local"``, kept counts rounded down to a multiple of
        this (8, 64: shapes the hardware's tiles divide), never below one
        multiple; groups of fewer units than that keep their count.
    stats : mapping, optional
        :func:`input_stats` of the consumers, collected once for several
        runs on the same dense model (instead of ``data``; ``order="model"``).

    Returns :func:`remove_units`' counts.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    if repair not in REPAIRS:
        raise ValueError(f"repair must be one of {list(REPAIRS)}, got {repair!r}")
    if order not in ("model", "block"):
        raise ValueError(f"order must be 'model' or 'block', got {order!r}")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
    if order == "block" and (data is None or scope != "local"):
        raise ValueError("order='block' cuts block by block with the same count in every layer: it needs "
                         "scope='local' and calibration batches (data=)")
    if (score == "fluctuation" and scores is None or repair != "none") and data is None and stats is None:
        raise ValueError(f"score={score!r} and repair={repair!r} need calibration batches (data=)")
    kinds = [units] if isinstance(units, str) else list(units)
    fractions = dict(sparsity) if isinstance(sparsity, Mapping) else {k: sparsity for k in kinds}
    extra = [k for k in fractions if k not in kinds]
    if extra:
        raise ValueError(f"sparsity names {extra}, which are not among units {kinds}")
    reduce = "l1" if score == "fluctuation" and scores is None else "l2"
    groups, kind_of = [], {}
    for k in kinds:
        for g in unit_groups(model, k, reduce=reduce):
            groups.append(g)
            kind_of[g.name] = k
    per = {}
    for g in groups:  # each group's fraction, its kept count rounded to the multiple
        f = fractions.get(kind_of[g.name], 0.0)
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f < 1:
            raise ValueError(f"sparsity of {kind_of[g.name]} must be a number in [0, 1), got {f!r}")
        keep_n = g.units - int(round(f * g.units))
        if multiple > 1 and scope == "local":
            keep_n = max(multiple, keep_n // multiple * multiple) if g.units >= multiple else keep_n
        per[g.name] = (g.units - keep_n) / g.units
    cut = _Cut(model, score, scores, repair, damp, scope, max_sparsity)
    if order == "model":
        if stats is None and data is not None:
            stats = input_stats(model, data, [consumer(g) for g in groups], max_batches=max_batches)
        counts = cut(groups, per, stats)
    else:
        counts = _block_by_block(model, data, groups, per, cut, max_batches)
    _update_counts(model, groups, counts)
    if cut.biased:
        _stock_biases(model)
    return counts


class _Cut:
    """One selection, repair and removal over some groups, from their consumers' statistics."""

    def __init__(self, model, score, scores, repair, damp, scope, max_sparsity):
        self.model, self.score, self.scores, self.repair, self.damp = model, score, scores, repair, damp
        self.scope, self.max_sparsity, self.biased = scope, max_sparsity, False

    def __call__(self, groups, per, stats):
        model = self.model
        params = dict(model.named_parameters())
        scores = self.scores
        if scores is None and self.score == "fluctuation":
            scores = fluctuation_scores(groups, model, stats)
        weights = {t: params[t].detach().float().cpu().numpy() for g in groups for t in g.tensors()}
        if self.scope == "global":  # FLAP's standardisation: each group's unit scores as z-scores, so that
            # groups of different scales (attention, MLP, early and late layers) rank against each other
            elem = scores if scores is not None else {t: np.abs(w) for t, w in weights.items()}
            unit = {}
            for g in groups:
                u = sc.group_scores(g, {t: elem[t] for t in g.tensors() if t in elem})
                sd = float(u.std())
                unit[g.name] = (u - u.mean()) / sd if sd > 0 else np.zeros_like(u)
            scores = unit
        kw = {} if self.max_sparsity is None else {"max_sparsity": self.max_sparsity}
        target = {g.name: per[g.name] for g in groups} if self.scope == "local" else \
            sum(per[g.name] * g.units for g in groups) / sum(g.units for g in groups)
        keep = sc.prune(weights, scores, groups=groups, sparsity=target, scope=self.scope, **kw).groups
        repaired = {}
        if self.repair != "none":
            kept = sc.kept_entries(groups, keep, {t: w.shape for t, w in weights.items()})
            for g in groups:
                c = consumer(g)
                h, mu, _ = stats[c]
                w = params[f"{c}.weight"].detach().double().cpu().numpy()
                repaired[c] = sc.refit_inputs(w, kept[(f"{c}.weight", 1)], h, mean=mu, damp=self.damp,
                                              method="bias" if self.repair == "bias" else "refit",
                                              bias=self.repair != "refit", name=f"{c}.weight")
        counts = remove_units(model, keep, groups, config=False)
        for c, (new_w, shift) in repaired.items():  # the model is cut: the consumers' repaired weights go in
            lin = model.get_submodule(c)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(new_w))
            if shift is not None:
                _with_bias(model, c, shift)
                self.biased = True
        return counts


def _block_by_block(model, data, groups, per, cut, max_batches):
    """:func:`prune_units` with ``order="block"``: the stack's inputs caught once, then each block's
    attention and MLP cut in turn on the inputs the cut blocks before give it."""
    stack_name, stack = sct._stack_of(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__}: order='block' needs a transformer's stack of blocks, and none "
                         f"was found; use order='model'")
    counts = {}
    with torch.no_grad(), sct._no_kv_cache(model):
        cache = sct._stack_inputs(model, stack, data, max_batches)
        for i, block in enumerate(stack):
            mine = [g for g in groups if g.name.startswith(f"{stack_name}.{i}.")]
            attention = [g for g in mine if _is_attention(model.get_submodule(g.name))]
            for part in (attention, [g for g in mine if g not in attention]):
                if not part:
                    continue
                sums = _InputSums({consumer(g): model.get_submodule(consumer(g)) for g in part})
                try:
                    for item in cache:
                        sums.mask = item[2]
                        block(*item[0], **item[1])
                finally:
                    sums.remove()
                counts.update(cut(part, per, sums.result()))
            cache = [sct._advance(item, block(*item[0], **item[1])) for item in cache]
    return counts


def _is_attention(mod):
    return isinstance(getattr(mod, "q_proj", None), nn.Linear) or \
        isinstance(getattr(getattr(mod, "self", None), "query", None), nn.Linear)

"""The package's shape: imports flow one way, and the public namespaces are what they say.

Inside the public floor, the layers go engine (scores, selection, patterns,
formats, the prune orchestration) -> repair (``reconstruct``, the sequential
calibration driver ``sequential``) -> files
(``sparsecore.io``) -> the package face, distribution and command line; the
adapters sit on top, outside the package. A layer imports only from its own
or lower ones. The adapters, benchmarks and examples use public modules and
names only.

Floors, top to bottom: the public modules (and the command line, the demo,
the I/O package); the device host code ``sparsecore/_cuda``; the private
helpers (``_source``, ``_mi``, ``_device``, ``_validate``, ``_atomic``,
``_version``); the kernels ``sparsecore/_kernels``. A module imports only from
its own floor or lower, no two files import each other (directly or through
others), and no module imports another's private name. Every import counts:
module level, inside functions (the lazy device imports) and under
``TYPE_CHECKING``.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

import sparsecore as sc
from sparsecore import cuda as scu

PACKAGE = pathlib.Path(sc.__file__).parent
HELPERS = {"sparsecore._source", "sparsecore._mi", "sparsecore._device", "sparsecore._validate",
           "sparsecore._atomic", "sparsecore._version"}


def _modules():
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name, path):
    """``(target module, imported name or None)`` of every import in a module of the package."""
    tree = ast.parse(path.read_text())
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = base[:len(base) - node.level + 1] if node.level else []
            mod = ".".join(parts + ([node.module] if node.module else []))
            if not mod.startswith("sparsecore"):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield (sub, None) if sub in MODULES else (mod, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparsecore"):
                    yield alias.name, None


GRAPH = {m: sorted({t for t, _ in _imports(m, p) if t != m}) for m, p in MODULES.items()}


def floor(module):
    """0 kernels, 1 private helpers, 2 device host code, 3 everything else."""
    if module.startswith("sparsecore._kernels"):
        return 0
    if module in HELPERS:
        return 1
    if module.startswith("sparsecore._cuda"):
        return 2
    return 3


def _loops(graph):
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert "sparsecore._cuda.select" in GRAPH["sparsecore.selection"]  # an import inside a function
    assert "sparsecore._kernels.cuda_csr" in GRAPH["sparsecore._cuda.csr"]
    assert len(MODULES) > 40


def test_no_import_loops():
    assert _loops(GRAPH) == []
    assert _loops({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]  # the check can fail


def test_imports_flow_down():
    up = [(m, t) for m, targets in GRAPH.items() for t in targets if t in MODULES and floor(t) > floor(m)]
    assert up == [], f"imports that run back up a floor: {up}"


def test_no_private_names_from_other_modules():
    bad = [(m, t, n) for m, p in MODULES.items() for t, n in _imports(m, p)
           if n is not None and n.startswith("_") and not n.startswith("__") and t != m]
    assert bad == [], f"private names imported from other modules: {bad}"


def test_device_code_sits_beside_its_kernels():
    device = sorted(m for m in MODULES if m.startswith("sparsecore._cuda."))
    topics = {m.rsplit(".", 1)[1] for m in device}
    assert {"arrays", "select", "csr", "pattern", "importance", "mi"} <= topics
    kernels = {m.rsplit(".", 1)[1] for m in MODULES if m.startswith("sparsecore._kernels.cuda_")}
    assert {f"cuda_{t}" for t in topics - {"arrays"}} <= kernels


def test_import_imports_neither_numba_cuda_nor_frameworks():
    code = ("import sys, sparsecore, sparsecore.cuda, sparsecore.activations; "
            "print(sorted(m for m in ('torch', 'keras', 'tensorflow', 'numba.cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", [sc, scu], ids=["sparsecore", "sparsecore.cuda"])
def test_public_namespace_is_sorted_and_complete(module):
    assert module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    public = {n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
              and getattr(v, "__module__", "").startswith("sparsecore")}
    assert public <= set(module.__all__), public - set(module.__all__)


def test_cuda_face_holds_the_device_classes():
    for name in ("DeviceAccumulator", "DeviceCSR", "PairMICounts", "UnitMICounts"):
        assert name in scu.__all__ and isinstance(getattr(scu, name), type)
    with pytest.raises(AttributeError, match="no attribute 'select_rule'"):
        scu.select_rule  # noqa: B018 - dead code, gone


ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
LAYERS = ["engine", "repair", "io", "top"]
REPAIR = {"sparsecore.reconstruct", "sparsecore.sequential"}
TOP = {"sparsecore", "sparsecore.__main__", "sparsecore.cli", "sparsecore._demo", "sparsecore.parallel"}


def layer(module):
    """Where a public-floor module sits (see the module doc)."""
    if module in TOP:
        return "top"
    if module in REPAIR:
        return "repair"
    if module == "sparsecore.io" or module.startswith("sparsecore.io."):
        return "io"
    return "engine"


def test_layers_flow_down():
    public = {m for m in MODULES if floor(m) == 3}
    up = [(m, t) for m in public for t in GRAPH[m] if t in public and
          LAYERS.index(layer(t)) > LAYERS.index(layer(m))]
    assert up == [], f"imports that run back up a layer: {up}"
    assert layer("sparsecore.selection") == "engine" and layer("sparsecore.io.offline") == "io"
    assert [m for m in public if layer(m) == "engine" and "io" in m.split(".")] == []


def _outside_files():
    for folder in ("adapters", "bench", "examples"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _outside_imports(path):
    """``(module, name or None)`` of every sparsecore import in a file outside the package (relative imports of
    an adapter read as ``sparsecore.adapters``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = "sparsecore.adapters" + (f".{mod}" if mod else "")
            if not mod.startswith("sparsecore"):
                continue
            for alias in node.names:
                yield mod, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparsecore"):
                    yield alias.name, None


def _private(mod, name):
    parts = mod.split(".") + ([name] if name else [])
    return any(p.startswith("_") and not p.startswith("__") for p in parts[1:])


def test_adapters_benchmarks_and_examples_use_public_names_only():
    files = list(_outside_files())
    assert len(files) > 10 and any(p.name == "torch.py" for p in files)
    bad = [(str(p.relative_to(ROOT)), m, n) for p in files for m, n in _outside_imports(p)
           if _private(m, n) and not (p.parent.name == "adapters" and m.startswith("sparsecore.adapters"))]
    assert bad == [], f"private sparsecore modules or names used from outside the package: {bad}"
    assert _private("sparsecore.io._safetensors", None) and _private("sparsecore.packed", "_avx2")  # it can fail
    assert not _private("sparsecore.io", "save_safetensors")


def test_adapters_sit_above_the_engine_and_never_import_the_command_line():
    for p in (ROOT / "adapters").glob("*.py"):
        mods = {m for m, _ in _outside_imports(p)}
        assert not any(m == "sparsecore.cli" or m.startswith("sparsecore.cli.") for m in mods), p

"""Every CUDA kernel compiled for real GPUs, on the CPU, with every argument type it can be launched with.

Numba's CUDA simulator runs kernels as Python: it neither types nor compiles
them, so a kernel can pass every simulator test and still fail at its first
launch on a GPU. Here each kernel found in ``sparsecore/_kernels/cuda_*.py``
is compiled to PTX by NVVM for compute capabilities 8.0 and 9.0 with each
signature its module declares in ``SIGNATURES`` (the simulator tests check
that every launch they make is declared), and assembled by ``ptxas``, which
reports registers, shared memory and spills (printed below the test). No GPU
or driver is needed: ``numba-cuda[cu12]`` brings NVVM, libdevice and ptxas.

Runs in a process of its own without the simulator:
``SPARSECORE_COMPILE_PTX=1 python3 -m pytest tests/test_cuda_compile.py``
(``.ci/run`` does); skipped otherwise.
"""

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import types

import pytest

CCS = [(8, 0), (9, 0)]
STATIC_SHARED_LIMIT = 48 * 1024  # bytes of static shared memory a block can have

if os.environ.get("SPARSECORE_COMPILE_PTX") != "1":
    pytest.skip("PTX compilation runs in a process of its own: SPARSECORE_COMPILE_PTX=1 "
                "python3 -m pytest tests/test_cuda_compile.py", allow_module_level=True)
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the CUDA simulator compiles nothing; run without NUMBA_ENABLE_CUDASIM", allow_module_level=True)

from numba import cuda  # noqa: E402
from numba.cuda.dispatcher import CUDADispatcher  # noqa: E402

import sparsecore._kernels as kernels_pkg  # noqa: E402


def _ptxas():
    """The ptxas of the numba-cuda[cu12] wheels, else one on PATH."""
    try:
        import nvidia.cuda_nvcc as nvcc

        path = os.path.join(list(nvcc.__path__)[0], "bin", "ptxas")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("ptxas")


PTXAS = _ptxas()
if PTXAS is None:
    pytest.fail("ptxas not found: pip install 'numba-cuda[cu12]'", pytrace=False)


def _modules():
    names = sorted(m.name for m in pkgutil.iter_modules(kernels_pkg.__path__) if m.name.startswith("cuda_"))
    return [importlib.import_module(f"sparsecore._kernels.{n}") for n in names]


MODULES = _modules()


def _dispatchers(mod):
    """``(kernels, device functions)`` defined in ``mod``, by name."""
    kernels, device = {}, {}
    for name, v in vars(mod).items():
        if isinstance(v, CUDADispatcher) and v.py_func.__module__ == mod.__name__:
            (device if v.targetoptions.get("device") else kernels)[name] = v
    return kernels, device


KERNELS = [(mod, name, k) for mod in MODULES for name, k in sorted(_dispatchers(mod)[0].items())]


def test_the_kernel_modules_are_found():
    names = {m.__name__.rsplit(".", 1)[1] for m in MODULES}
    assert {"cuda_accumulate", "cuda_csr", "cuda_importance", "cuda_mi", "cuda_pattern", "cuda_select"} <= names
    assert len(KERNELS) >= 31


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_kernel_declares_its_signatures(mod):
    kernels, _ = _dispatchers(mod)
    declared = getattr(mod, "SIGNATURES", None)
    assert isinstance(declared, dict), f"{mod.__name__} declares no SIGNATURES"
    assert set(declared) == set(kernels), (f"{mod.__name__}: kernels without SIGNATURES "
                                           f"{sorted(set(kernels) - set(declared))}, SIGNATURES of no kernel "
                                           f"{sorted(set(declared) - set(kernels))}")
    for name, sigs in declared.items():
        params = kernels[name].py_func.__code__.co_argcount
        assert sigs, f"{mod.__name__}.{name}: no signature declared"
        assert len(set(sigs)) == len(sigs), f"{mod.__name__}.{name}: a signature is declared twice"
        for sig in sigs:
            assert len(sig) == params, f"{mod.__name__}.{name}: {len(sig)} types for {params} parameters"


def _names_used(code):
    """Global names a function's code reads, nested code objects included."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names_used(c)
    return out


def test_every_device_function_is_compiled_through_a_kernel():
    """Device functions are compiled as part of the kernels that call them
    (inlined); one no kernel reaches would escape the check."""
    reached, todo = set(), [k for _, _, k in KERNELS]
    while todo:
        f = todo.pop()
        for name in _names_used(f.py_func.__code__):
            g = f.py_func.__globals__.get(name)
            if isinstance(g, CUDADispatcher) and g.targetoptions.get("device") and g not in reached:
                reached.add(g)
                todo.append(g)
    for mod in MODULES:
        for name, f in _dispatchers(mod)[1].items():
            assert f in reached, f"device function {mod.__name__}.{name} is called by no kernel"


_STATS = re.compile(r"Compiling entry function '(?P<fn>[^']+)'.*?"
                    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
                    r".*?Used (?P<regs>\d+) registers(?:, used \d+ barriers)?(?:, (?P<smem>\d+) bytes smem)?",
                    re.S)


def _assemble(ptx, cc, tmp_path):
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    run = subprocess.run([PTXAS, f"-arch=sm_{cc[0]}{cc[1]}", "-v", "-o", os.devnull, str(src)],
                         capture_output=True, text=True)
    assert run.returncode == 0, f"ptxas failed for sm_{cc[0]}{cc[1]}:\n{run.stderr}"
    m = _STATS.search(run.stderr)
    assert m, f"no resource usage in ptxas output:\n{run.stderr}"
    return {"regs": int(m["regs"]), "smem": int(m["smem"] or 0), "stack": int(m["stack"]),
            "spill": int(m["st"]) + int(m["ld"])}


@pytest.mark.parametrize("mod, name, kernel", KERNELS,
                         ids=[f"{m.__name__.rsplit('.', 1)[1]}.{n}" for m, n, _ in KERNELS])
def test_kernel_compiles_and_assembles(mod, name, kernel, tmp_path, capsys):
    opts = kernel.targetoptions
    worst = {}
    for cc in CCS:
        for sig in mod.SIGNATURES[name]:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc, fastmath=opts.get("fastmath", False),
                                      debug=opts.get("debug", False), lineinfo=opts.get("lineinfo", False))
            assert f".target sm_{cc[0]}{cc[1]}" in ptx
            assert ".entry" in ptx
            use = _assemble(ptx, cc, tmp_path)
            assert use["spill"] == 0, f"{name}{sig} spills {use['spill']} bytes on sm_{cc[0]}{cc[1]}"
            assert use["smem"] <= STATIC_SHARED_LIMIT
            w = worst.setdefault(cc, dict.fromkeys(use, 0))
            for k, v in use.items():
                w[k] = max(w[k], v)
    with capsys.disabled():
        for cc, w in worst.items():
            qual = f"{mod.__name__.rsplit('.', 1)[1]}.{name}"
            print(f"\n  {qual:<34} sm_{cc[0]}{cc[1]}  "
                  f"{len(mod.SIGNATURES[name]):2d} signatures  registers <= {w['regs']:3d}  "
                  f"shared {w['smem']:5d} B  stack {w['stack']:5d} B  spills {w['spill']} B", end="")

"""The command line: commands, one-line errors, and runs killed at random moments."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsecore.io import _safetensors as st
from sparsecore.io import open_weights


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsecore", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_st(path, tensors):
    with open(path, "wb") as f:
        st.write(f, [(k, st.dtype_name(v.dtype), v.shape, lambda v=v: v) for k, v in tensors.items()])


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "prune", "densify", "report", "demo"):
        assert cmd in r.stdout
    assert run("prune", "--help").returncode == 0
    assert "sparsecore" in run("--version").stdout


def test_prune_embedded_default(tmp_path):
    r = run("prune", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "embedded default model" in r.stdout and "90.00%" in r.stdout
    assert "test accuracy: dense 0.802" in r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written without -o
    r = run("prune", "-o", tmp_path / "d.sparse.h5", "--quiet")
    assert r.returncode == 0 and r.stdout == ""
    with open_weights(tmp_path / "d.sparse.h5") as f:
        assert f.format == "sparse" and set(f.pruned) == {"fc1.weight", "fc2.weight"}


def test_info_prune_densify_report(tmp_path, rng):
    src = tmp_path / "m.safetensors"
    write_st(src, {"a.weight": rng.standard_normal((32, 16)).astype(np.float32),
                   "a.bias": np.zeros(32, np.float32), "ids": np.arange(5, dtype=np.int64)})
    r = run("info", src)
    assert r.returncode == 0 and "a.weight" in r.stdout and "(32, 16)" in r.stdout and "int64" in r.stdout
    r = run("prune", src, "-o", tmp_path / "m.sparse.h5", "--sparsity", "0.75")
    assert r.returncode == 0, r.stderr
    assert "75.00%" in r.stdout and "written" in r.stdout
    r = run("report", tmp_path / "m.sparse.h5")
    assert r.returncode == 0 and "75.00%" in r.stdout
    for cmd in ("info", "report"):  # the provenance the sparse file records
        out = run(cmd, tmp_path / "m.sparse.h5").stdout
        assert "made by tool_version=" in out and "criterion=magnitude" in out and "sparsity=0.75" in out
        assert f"source_file={src}" in out and "source_sha256=" + sha(src) in out
    r = run("densify", tmp_path / "m.sparse.h5", "-o", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    with open_weights(tmp_path / "back.safetensors") as f:
        assert (f.raw("a.weight") == 0).sum() == 384 and f.raw("ids").tolist() == list(range(5))


def test_report_plot(tmp_path, rng):
    pytest.importorskip("matplotlib")
    src = tmp_path / "m.safetensors"
    write_st(src, {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    r = run("report", src, "--plot", tmp_path / "p.png")
    assert r.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    other = tmp_path / "notes.txt"  # an existing file is replaced only with --force
    other.write_text("keep me")
    r = run("report", src, "--plot", other)
    assert r.returncode == 1 and "notes.txt: exists; pass --force" in r.stderr and other.read_text() == "keep me"
    r = run("prune", src, "-o", other, "--sparsity", "0.5")  # the command line's words, not the keyword's
    assert r.returncode == 1 and "notes.txt: exists; pass --force to replace it" in r.stderr
    assert "force=True" not in r.stderr and other.read_text() == "keep me"
    r = run("report", src, "--plot", other, "--force")
    assert r.returncode == 0 and other.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (("prune", "missing.h5", "-o", "x.h5", "--sparsity", "0.5"), "missing.h5: no such file"),
    (("prune", "bad.h5", "-o", "x.h5", "--sparsity", "0.5"), "unknown weight-file format"),
    (("prune", "m.safetensors", "-o", "m.safetensors", "--sparsity", "0.5", "--force"), "overwrite the input"),
    (("info", "bad.h5"), "unknown weight-file format"),
    (("densify", "m.safetensors", "-o", "o.safetensors"), "not a sparsecore sparse file"),
])
def test_user_errors_are_one_line(tmp_path, rng, args, message):
    write_st(tmp_path / "m.safetensors", {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    (tmp_path / "bad.h5").write_text("not hdf5\n")
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsecore: error:")
    import re

    assert re.search(message, lines[0])
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "o.safetensors").exists()


def test_usage_errors_exit_2(tmp_path):
    assert run("prune", "m.safetensors", cwd=tmp_path).returncode == 2  # no -o
    assert run("nonsense").returncode == 2


@pytest.mark.parametrize("flags, message", [
    (("--sparsity", "1.5"), r"--sparsity must lie in \[0, 1\], got 1.5"),
    (("--sparsity", "0.5", "--criterion", "foo"), r"--criterion 'foo' is not a known criterion; known: fisher"),
    (("--sparsity", "0.5", "--criterion", "fisher"), r"--criterion fisher needs statistics .* --scores FILE"),
    (("--sparsity", "0.5", "--criterion", "wanda"), r"--criterion wanda needs statistics"),
    (("--sparsity", "0.5", "--max-sparsity", "0.3"), r"--sparsity 0.5 lies outside --min-sparsity 0.0 .. "
                                                      r"--max-sparsity 0.3; in local scope"),
    (("--pattern", "2-4"), r"--pattern an N:M pattern is written like '2:4', got '2-4'"),
])
def test_flags_are_checked_before_any_file_is_read(tmp_path, flags, message):
    import re

    r = run("prune", "absent.safetensors", "-o", "o.safetensors", *flags, cwd=tmp_path)  # no such file
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsecore: error: prune: ") and re.search(message, last), last
    assert not (tmp_path / "o.safetensors").exists()


def test_a_criterion_that_needs_no_statistics_runs_without_scores(tmp_path, rng):
    write_st(tmp_path / "m.safetensors", {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    r = run("prune", "m.safetensors", "-o", "o.safetensors", "--sparsity", "0.5", "--criterion",
            "magnitude_squared", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_killed_runs_never_leave_partial_output(tmp_path):
    """Kill `sparsecore prune` at random moments (SIGKILL and Ctrl-C): the output is
    either absent or complete, the input never changes."""
    rng = np.random.default_rng(7)
    src = tmp_path / "big.safetensors"
    write_st(src, {f"layer{i}.weight": rng.standard_normal((512, 512)).astype(np.float32) for i in range(48)})
    before = sha(src)
    ref = tmp_path / "ref.safetensors"
    assert run("prune", src, "-o", ref, "--sparsity", "0.9", "--scope", "global", "--quiet").returncode == 0
    t0 = time.perf_counter()
    assert run("prune", src, "-o", tmp_path / "t.safetensors", "--sparsity", "0.9", "--scope", "global",
               "--quiet").returncode == 0
    full = time.perf_counter() - t0
    outcomes = set()
    for i, sig in enumerate([signal.SIGKILL, signal.SIGINT, signal.SIGTERM] * 3):
        out = tmp_path / f"out{i}.safetensors"
        p = subprocess.Popen([sys.executable, "-m", "sparsecore", "prune", str(src), "-o", str(out), "--sparsity",
                              "0.9", "--scope", "global", "--quiet"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(float(rng.uniform(0.1, 1.1)) * full)
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
        # Ctrl-C while Python is still importing the package shows Python's own
        # KeyboardInterrupt traceback; once sparsecore runs, one line. Numba sets up
        # its LLVM target while the package is imported, before any handler of ours
        # exists: a Ctrl-C in those milliseconds is printed as "Exception ignored" and
        # lost, and the run completes. After that it is never lost (the CLI defers it
        # while Numba compiles).
        if "Exception ignored" in err:
            assert sig == signal.SIGINT and p.returncode == 0 and out.exists(), (p.returncode, err)
        else:
            assert "Traceback" not in err or err.rstrip().endswith("KeyboardInterrupt"), err
        if out.exists():
            outcomes.add("complete")
            assert sha(out) == sha(ref)  # a finished file, identical to an undisturbed run
        else:
            outcomes.add("absent")
        if sig != signal.SIGKILL:  # Ctrl-C and SIGTERM clean their temporary file up
            assert not [q for q in tmp_path.iterdir() if q.name.startswith(f".out{i}.")]
            if p.returncode not in (0, -sig):  # -sig: the signal came before Python (or the CLI) took it over
                assert p.returncode == (143 if sig == signal.SIGTERM else 130), (p.returncode, err)
                assert err.strip().splitlines()[-1] == (
                    "sparsecore: terminated; no output was written" if sig == signal.SIGTERM
                    else "sparsecore: interrupted; no output was written")
        assert sha(src) == before
    assert "absent" in outcomes


def test_a_closed_pipe_ends_quietly(tmp_path, rng):
    """`sparsecore info x | head -1`: the reader leaves early; no error, no traceback."""
    src = tmp_path / "many.safetensors"
    write_st(src, {f"a_rather_long_tensor_name_{i:05d}.weight": np.zeros((2, 2), np.float32) for i in range(3000)})
    p = subprocess.Popen([sys.executable, "-m", "sparsecore", "info", str(src)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline()
    p.stdout.close()  # the output is far beyond the pipe's buffer: the next writes fail
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == ""


def test_ctrl_c_inside_numbas_compiler_waits_for_it_to_finish():
    """A Ctrl-C that lands while Numba holds its compiler lock (LLVM's ctypes
    callbacks would swallow it) is raised when the lock is released."""
    from numba.core.compiler_lock import global_compiler_lock

    from sparsecore.cli import _CompileSafeInterrupt

    before = signal.getsignal(signal.SIGINT)
    steps = []
    with _CompileSafeInterrupt().installed():
        with pytest.raises(KeyboardInterrupt):
            with global_compiler_lock:
                with global_compiler_lock:  # re-entered, as compiling a callee does
                    os.kill(os.getpid(), signal.SIGINT)
                    steps.append("inner")
                steps.append("outer")
            steps.append("after")
        assert steps == ["inner", "outer"]
        with pytest.raises(KeyboardInterrupt):  # outside the compiler: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before


def test_long_names_keep_the_columns(tmp_path, rng):
    long = "model.encoder.layers.11.self_attention.query_key_value_projection.weight"  # 71 characters
    write_st(tmp_path / "m.safetensors", {long: rng.standard_normal((8, 8)).astype(np.float32),
                                          "b": rng.standard_normal((8, 8)).astype(np.float32)})
    for args in (("info", "m.safetensors"), ("report", "m.safetensors"),
                 ("prune", "m.safetensors", "-o", "o.safetensors", "--sparsity", "0.5")):
        out = run(*args, cwd=tmp_path).stdout.splitlines()
        head = next(i for i, line in enumerate(out) if line.startswith("tensor"))
        rows = [line for line in out[head:] if line.startswith((long, "b ", "tensor"))]
        assert len(rows) == 3, out
        starts = {line.index(" (8, 8)") if "(8, 8)" in line else line.index(" shape") for line in rows}
        assert len(starts) == 1, out  # the shape column starts at one place in every row


def test_report_plot_without_matplotlib_is_an_error(tmp_path, rng):
    src = tmp_path / "m.safetensors"
    write_st(src, {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocked") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "sparsecore", "report", str(src), "--plot", str(tmp_path / "p.png")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip() == ("sparsecore: error: report --plot needs matplotlib "
                                                      "(pip install matplotlib); nothing was written")
    assert not (tmp_path / "p.png").exists()


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    from sparsecore.cli import _Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    _Progress(True)(1, 2, "a")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = _Progress(True)
    bar(1, 2, "layer.a")
    bar(2, 2, "layer.b")
    err = capsys.readouterr().err
    assert "1/2 layer.a" in err and "2/2 layer.b" in err and err.endswith("\n") and "#" * 30 in err
    _Progress(False)(1, 2, "a")  # --quiet
    assert capsys.readouterr().err == ""
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])  # created; item 1 at 10 s; 2 at 20 s: 8 left at 10 s each
    monkeypatch.setattr("sparsecore.cli.time.monotonic", lambda: next(clock))
    bar = _Progress(True)
    bar(1, 10, "a")
    bar(2, 10, "b")
    assert capsys.readouterr().err.rstrip().endswith("ETA 1:20")


# --- safe by default (issue 15) ----------------------------------------------------------

def _mixed_model(path, rng):
    """Tensors a default prune takes (2-D weights) and leaves out (embedding, depthwise kernel, recurrent
    kernel, STFT basis, biases), one of them far smaller in magnitude than the rest."""
    t = {"model.embed_tokens.weight": rng.standard_normal((50, 8)).astype(np.float32),
         "layers.0.dense.weight": rng.standard_normal((8, 8)).astype(np.float32),
         "layers.0.dense.bias": rng.standard_normal(8).astype(np.float32),
         "layers.1.tiny.weight": (1e-4 * rng.standard_normal((8, 8))).astype(np.float32),
         "layers.1.big.weight": rng.standard_normal((64, 8)).astype(np.float32),
         "conv.depthwise_kernel": rng.standard_normal((3, 3, 8, 1)).astype(np.float32),
         "lstm.weight_hh_l0": rng.standard_normal((32, 8)).astype(np.float32),
         "frontend.stft.forward_basis": rng.standard_normal((18, 1, 16)).astype(np.float32)}
    write_st(path, t)
    return t


def test_the_default_set_leaves_out_what_users_rarely_mean_to_prune(tmp_path, rng):
    src = tmp_path / "m.safetensors"
    _mixed_model(src, rng)
    with open_weights(src) as r:
        assert r.select() == ["layers.0.dense.weight", "layers.1.tiny.weight", "layers.1.big.weight"]
        assert {n: r.entries[n].left_out for n in r.entries if r.entries[n].left_out} == {
            "model.embed_tokens.weight": "embedding", "conv.depthwise_kernel": "depthwise kernel",
            "lstm.weight_hh_l0": "recurrent kernel", "frontend.stft.forward_basis": "fixed basis"}
        assert len(r.select(take_all=True)) == 7
        assert r.select(["layers.0*"]) == ["layers.0.dense.weight"]  # --include keeps the 2-D rule ...
        assert r.select(["layers.0*"], any_rank=True) == ["layers.0.dense.weight", "layers.0.dense.bias"]
        assert r.select(["*embed*"]) == []  # ... and the left-out set: --take-all takes it
        assert r.select(["*embed*"], take_all=True) == ["model.embed_tokens.weight"]
    out = run("info", src).stdout
    assert "no: embedding (--take-all)" in out and "no: fixed basis (--take-all)" in out
    r = run("prune", src, "-o", tmp_path / "o.safetensors", "--sparsity", "0.5", "--include", "layers.0*")
    assert r.returncode == 0, r.stderr
    with open_weights(tmp_path / "o.safetensors") as o:
        assert np.count_nonzero(o.raw("layers.0.dense.bias")) == 8  # biases untouched despite the pattern
        assert np.count_nonzero(o.raw("layers.0.dense.weight")) == 32


def test_a_global_prune_never_empties_a_tensor_unless_asked(tmp_path, rng):
    src = tmp_path / "m.safetensors"
    _mixed_model(src, rng)
    r = run("prune", src, "-o", tmp_path / "o.safetensors", "--sparsity", "0.8", "--scope", "global")
    assert r.returncode == 0, r.stderr
    with open_weights(tmp_path / "o.safetensors") as o:
        kept = {n: np.count_nonzero(o.raw(n)) for n in o.entries}
    assert kept["layers.1.tiny.weight"] == 1  # at the default cap 0.99 of 64 entries: one stays
    assert "warning: 1 tensor ends at 95% sparsity or more (cap 0.99): layers.1.tiny.weight 98.44%;" in r.stderr
    assert kept["model.embed_tokens.weight"] == 400  # left out
    r = run("prune", src, "-o", tmp_path / "e.safetensors", "--sparsity", "0.8", "--scope", "global",
            "--max-sparsity", "1")
    assert r.returncode == 0 and "(cap 1): layers.1.tiny.weight 100.00% (emptied)" in r.stderr
    r = run("prune", src, "-o", tmp_path / "t.safetensors", "--threshold", "0.01", "--quiet")
    assert r.returncode == 0 and "(cap 0.99): layers.1.tiny.weight 98.44%" in r.stderr
    r = run("prune", src, "-o", tmp_path / "l.safetensors", "--sparsity", "0.97", "--quiet")
    assert r.returncode == 0 and r.stderr == ""  # exactly what was asked, per tensor: no warning
    r = run("prune", src, "-o", tmp_path / "x.safetensors", "--sparsity", "0.995", "--scope", "global")
    assert r.returncode == 2 and "--max-sparsity 1" in r.stderr


def test_the_output_format_follows_its_name_or_format(tmp_path, rng):
    torch = pytest.importorskip("torch")
    w = {"a.weight": rng.standard_normal((8, 8)).astype(np.float32), "a.bias": np.ones(8, np.float32)}
    torch.save({k: torch.as_tensor(v) for k, v in w.items()}, tmp_path / "m.pt")
    r = run("prune", tmp_path / "m.pt", "-o", tmp_path / "o.safetensors", "--sparsity", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "o.safetensors", "rb") as f:
        assert f.read(2) != b"PK"  # not a torch zip under a safetensors name
    with open_weights(tmp_path / "o.safetensors") as o:
        assert o.format == "safetensors" and set(o.entries) == set(w)
        assert (o.raw("a.weight") == 0).sum() == 32 and np.array_equal(o.raw("a.bias"), w["a.bias"])
    write_st(tmp_path / "m.safetensors", w)
    r = run("prune", tmp_path / "m.safetensors", "-o", tmp_path / "o.bin", "--sparsity", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    with open_weights(tmp_path / "o.bin") as o:
        assert o.format == "torch" and (o.raw("a.weight") == 0).sum() == 32
    r = run("prune", tmp_path / "m.safetensors", "-o", tmp_path / "o.weights", "--sparsity", "0.5", "--quiet",
            "--format", "torch")
    assert r.returncode == 0 and open_weights(tmp_path / "o.weights").format == "torch"
    r = run("prune", tmp_path / "m.safetensors", "-o", tmp_path / "o.keras", "--sparsity", "0.5")
    assert r.returncode == 1 and "the name says keras, but a safetensors input is written as safetensors" in r.stderr
    assert not (tmp_path / "o.keras").exists()


def test_a_read_only_install_still_imports_and_caches_elsewhere(tmp_path):
    """Neither the package's folder nor $HOME writable (a container): the kernels' cache goes to a
    writable folder (here the temporary one) and sparsecore runs. As root every path is writable, so
    the package's folder is declared read-only through os.access; $HOME is a path no one can create."""
    code = (
        "import os, sys\n"
        "real = os.access\n"
        "os.access = lambda p, m, **k: False if 'sparsecore' in os.fspath(p) and 'sparsecore-' not in "
        "os.fspath(p) else real(p, m, **k)\n"
        "import sparsecore, numba\n"
        "print(numba.config.CACHE_DIR)\n"
        "from sparsecore.cli import main\n"
        "sys.exit(main(['prune', '--quiet']))\n")
    env = {**os.environ, "HOME": "/proc/no-home", "TMPDIR": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    env.pop("XDG_CACHE_HOME", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    chosen = r.stdout.split()[0]
    assert chosen == str(tmp_path / f"sparsecore-{os.getuid()}")
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(chosen) for f in fs)  # kernels cached there


def test_the_first_run_says_it_is_compiling(tmp_path, rng):
    write_st(tmp_path / "m.safetensors", {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "sparsecore", "prune", tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors",
           "--sparsity", "0.5", "--force"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = first.stderr.splitlines()
    assert first.returncode == 0 and len(lines) == 3, first.stderr
    assert "compiling kernels for this machine" in lines[0] and "kernels other weight files need" in lines[1]
    assert lines[2].startswith("sparsecore: compiled in")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "compiling" not in again.stderr
    # the other common cases were compiled ahead: a bfloat16 folder, globally, 2:4, into a sparse file
    with open(tmp_path / "b.safetensors", "wb") as f:
        st.write(f, [("w", "BF16", (64, 64), lambda: np.arange(4096, dtype=np.uint16).reshape(64, 64))])
    for extra in (["--scope", "global"], ["--pattern", "2:4"], ["-o", tmp_path / "b.sparse.h5"]):
        cmd = [sys.executable, "-m", "sparsecore", "prune", tmp_path / "b.safetensors", "-o",
               tmp_path / "b2.safetensors", "--force"] + (["--sparsity", "0.5"] if "--pattern" not in extra else [])
        r = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0 and "compiling" not in r.stderr, (extra, r.stderr)
    quiet = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True,
                           env={**env, "NUMBA_CACHE_DIR": str(tmp_path / "cache2")}, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_report_agrees_with_prune_and_plots_stay_readable(tmp_path, capsys):
    """report's total over the tensors prune takes is prune's own; the all-float total is said to count
    the rest too; a plot of 200 tensors draws one bar per block, its height bounded."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from sparsecore.cli import PLOT_ROWS, main
    from sparsecore.io import save_safetensors

    rng = np.random.default_rng(0)
    t = {"embed.weight": rng.standard_normal((50, 8)).astype(np.float32)}
    for i in range(100):
        t[f"layers.{i}.w"] = rng.standard_normal((8, 8)).astype(np.float32)
        t[f"layers.{i}.norm"] = np.ones(8, np.float32)
    save_safetensors(tmp_path / "m.safetensors", t)
    assert main(["prune", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "p.safetensors"), "--sparsity",
                 "0.9", "--scope", "global", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "p.safetensors"), "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    takes = next(line for line in out if line.startswith("the tensors prune takes"))
    assert "90.00%" in takes and "(100 tensors: what 'prune' reports)" in takes
    every = next(line for line in out if line.startswith("all float tensors"))
    assert f"{0.9 * 6400 / (6400 + 400 + 800):.2%}" in every and "201 tensors" in every
    height = imread(tmp_path / "s.png").shape[0]
    assert height <= (0.3 * PLOT_ROWS + 1.5) * 100 and height < 0.3 * 100 * 100  # not a bar per tensor
    from sparsecore.cli import _plot_rows

    with open_weights(tmp_path / "p.safetensors") as r:
        rows = [(n, e, 0.5) for n, e in r.entries.items() if e.default]
    labels, values = _plot_rows(rows)
    assert labels == [f"layers.{i}.*" for i in range(PLOT_ROWS - 1)] + ["... and 41 more"]

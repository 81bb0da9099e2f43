import subprocess
import sys

import sparsecore._demo as demo


def test_demo_workflow_end_to_end():
    lines = []
    res = demo.main(out=lines.append)
    assert sum(s.pruned for s in res["summary"]) == round(0.9 * (128 * 64 + 10 * 128))
    assert res["dense"] > 0.7
    assert res["tuned"] > res["pruned"]  # fine-tuning with masks held recovers accuracy
    assert res["csr"] == res["tuned"]  # CSR inference computes the masked network
    assert any("CSR logits" in line for line in lines)


def test_cli_runs_and_rejects_bad_sparsity():
    ok = subprocess.run([sys.executable, "-m", "sparsecore", "demo", "--sparsity", "0.5"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "test accuracy" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sparsecore", "demo", "--sparsity", "1.5"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--sparsity must lie in [0, 1]" in bad.stderr

#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (H100/H200 class; numba-cuda, CuPy and PyTorch
# with CUDA installed; no network): the CUDA tests on the device, then the GPU
# benchmarks. Results go under $OUT. Run from the repository root.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{ nvidia-smi; "$PY" -c "import numba, numpy, scipy, torch; from numba import cuda; print('numba', numba.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'torch', torch.__version__); cuda.detect()"; } > "$OUT/env.txt" 2>&1
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda_tests.txt" 2>&1
echo "cuda tests exit: $?" >> "$OUT/cuda_tests.txt"
timeout 300 "$PY" bench/gpu.py --json "$OUT/gpu.json" > "$OUT/gpu_bench.txt" 2>&1
echo "gpu bench exit: $?" >> "$OUT/gpu_bench.txt"
tail -3 "$OUT/cuda_tests.txt"
cat "$OUT/gpu_bench.txt"

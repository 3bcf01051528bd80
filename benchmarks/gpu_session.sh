#!/usr/bin/env bash
# Every GPU-only test and GPU measurement of the project, one stage per device call (each
# stage fits the device tool's 10-minute limit). Logs and tables are written to $OUT.
#
#   bash benchmarks/gpu_session.sh prep       # here, once: tokenizer files for the GPU tests
# then on the GPU machine (the device tool's `run`, carrying .gpu):
#   bash benchmarks/gpu_session.sh tests      # kernels in bf16/fp32, cuda-marked engine tests
#   bash benchmarks/gpu_session.sh kernels    # bench_kernels.py table
#   bash benchmarks/gpu_session.sh budget64   # bench_budget.py, reference shape, 64 sequences
#   bash benchmarks/gpu_session.sh budget256  # the same with 256 sequences
#
# The GPU machine has no network and cannot hold the embedded model, so the tests' tiny
# models take their tokenizer from .gpu/tokenizer (ELASTIC_DECODE_TEST_TOKENIZER) and the
# benchmarks build random-weight checkpoints at the reference shape (docs/architecture.md).
set -uo pipefail
stage=${1:?"stage: prep | tests | kernels | budget64 | budget256"}
OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

install() {
    python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
        || { tail -20 "$OUT/install.log"; exit 1; }
}

budget() {
    install
    python3 benchmarks/bench_budget.py --shape reference --seqs "$1" --prompt-len 256 --think 1024 \
        --solution 256 --repeats 1 --out "$OUT" 2>&1 | tee "$OUT/budget$1.log"
}

case $stage in
prep)
    .venv/bin/python - <<'PY'
import shutil
from pathlib import Path

from elastic_decode.models.loader import resolve_checkpoint

src, dst = resolve_checkpoint(None), Path(".gpu/tokenizer")
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
        shutil.copy(f, dst / f.name)
print(f"tokenizer files in {dst}: {sorted(p.name for p in dst.iterdir())}")
PY
    ;;
tests)
    install
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    ELASTIC_DECODE_TEST_TOKENIZER=$PWD/.gpu/tokenizer python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernels_attention.py tests/test_kernels_sampler.py tests/test_kernels_fused.py \
        tests/test_backend.py tests/test_multistep.py tests/test_cuda_graphs.py 2>&1 | tee "$OUT/tests.log"
    ;;
kernels)
    install
    OUT=$OUT python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/kernels.log"
    ;;
budget64) budget 64 ;;
budget256) budget 256 ;;
*)
    echo "unknown stage $stage (prep | tests | kernels | budget64 | budget256)" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Refresh the README's GPU table on one CUDA GPU: the four models in bf16 at batch 128, B-cos beside the
# original, first both compiled whole (torch.compile, fullgraph, static shapes), then both eager.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default outputs/benchmarks/gpu; aimed at < 8 minutes on an H200
#   bash benchmarks/gpu_check.sh --quick       # the same Python paths on the CPU: tiny models, aot_eager
#
# Each run writes results.json and results.md after every model, so a run cut short keeps what it measured.
# The compiled run comes first: its figures are the ones the targets are set for. Compilation (about six graphs
# per model: training, inference and explanation, for each model of the pair) happens in the warm-up pairs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--quick" ]]; then
    out=${2:-outputs/benchmarks/gpu-check-quick}
    common=(--quick --devices cpu --dtypes bf16 --iterations 1 --warmup 1)
    compiled=(--compile --compile-backend aot_eager)
else
    out=${1:-outputs/benchmarks/gpu}
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
    common=(--devices cuda --dtypes bf16 --cuda-batch 128)
    compiled=(--compile --warmup 2 --iterations 8)
fi

start=$SECONDS
python -m benchmarks.run "${common[@]}" "${compiled[@]}" --out "$out/compiled"
echo "gpu_check: compiled run took $((SECONDS - start)) s"
eager_start=$SECONDS
if [[ "${1:-}" == "--quick" ]]; then
    python -m benchmarks.run "${common[@]}" --out "$out/eager"
else
    python -m benchmarks.run "${common[@]}" --warmup 3 --iterations 10 --out "$out/eager"
fi
echo "gpu_check: eager run took $((SECONDS - eager_start)) s; total $((SECONDS - start)) s; tables in $out/{compiled,eager}/results.md"

#!/usr/bin/env bash
# Every GPU figure of bench/results in one go, on a machine with a CUDA GPU and the project installed
# (torch with CUDA, prefect, mlflow; d2l 0.17.6 with --no-deps for the book's side). About 6 minutes on an H200.
#
#   bash bench/gpu_suite.sh RESULTS_DIR [DATA_DIR]
#
# DATA_DIR holds timemachine.txt (default: ../shared/data beside the checkout). Each step writes its JSON and
# log under RESULTS_DIR and prints its table; a step that fails or runs over its time limit is reported and
# the next one runs.
set -u
RESULTS=${1:?usage: bash bench/gpu_suite.sh RESULTS_DIR [DATA_DIR]}
DATA=${2:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo; echo "== $1 (t=$(( $(date +%s) - T0 )) s)"; }
report() { echo "exit status $1"; tail -n "$3" "$2"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version())"

step "CUDA fast-path tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/lib/test_cuda_fast_path.py > "$RESULTS/cuda-tests.log" 2>&1
report $? "$RESULTS/cuda-tests.log" 3

step "book vs deeprnn, the book's preset, 500 epochs (precision auto: bf16 steps)"
timeout 200 python3 bench/train_speed.py --device cuda --epochs 500 --data "$DATA" --json "$RESULTS/compare.json" > "$RESULTS/compare.log" 2>&1
report $? "$RESULTS/compare.log" 30

step "book vs deeprnn, fp32 steps (the book's numerics)"
timeout 200 python3 bench/train_speed.py --device cuda --epochs 500 --data "$DATA" --precision fp32 --json "$RESULTS/compare-fp32.json" > "$RESULTS/compare-fp32.log" 2>&1
report $? "$RESULTS/compare-fp32.log" 30

step "whole deeprnn run --preset d2l-9.3: first run on a fresh Prefect home, then warm runs"
timeout 200 python3 bench/pipeline_overhead.py --data-url "$DATA/timemachine.txt" --runs 3 --json "$RESULTS/pipeline.json" -- --preset d2l-9.3 > "$RESULTS/pipeline.log" 2>&1
report $? "$RESULTS/pipeline.log" 12

step "full-book candidates (validation picks, test reported)"
timeout 200 python3 bench/tune_full_book.py --device cuda --parallel 6 --data "$DATA/timemachine.txt" --json "$RESULTS/full-book.json" > "$RESULTS/full-book.log" 2>&1
report $? "$RESULTS/full-book.log" 15

step "done"

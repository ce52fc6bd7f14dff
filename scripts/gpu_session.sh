#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call of bounded length: each step has its
# own time limit, a failure does not stop the next, and the whole stays inside TOTAL seconds so that
# the results are always packed. Results land under docs/results/ and in OUTDIR/results.tgz.
# Usage (repository root, on the GPU machine): scripts/gpu_session.sh OUTDIR [TOTAL seconds]
# Needs the CIFAR-10 subset at .gpudata/cifar10_subset.npz (or $UISPS_CIFAR10_SUBSET).
set -uo pipefail
out=${1:?usage: scripts/gpu_session.sh OUTDIR [TOTAL seconds]}
total=${2:-540}
data=${UISPS_CIFAR10_SUBSET:-.gpudata/cifar10_subset.npz}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) [${SECONDS}s] $*"; }
left() { echo $((total - SECONDS)); }

nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
log "bench perf"
timeout 120 $py -m uisps bench perf --device cuda --out docs/results
log "cuda graph check"
timeout 40 $py scripts/check_cuda_graph.py | tee docs/results/cuda-graph-check.json
log "core engine on the CIFAR-10 subset"
MODES="epoch steps350 plain" timeout 240 scripts/core_cifar_run.sh "$data" 30 docs/results/core-cifar-cuda cuda
$py scripts/summarize_core_cifar.py docs/results/core-cifar-cuda > docs/results/core-cifar-cuda.md
cat docs/results/core-cifar-cuda.md
budget=$(( $(left) - 70 ))
if [ "$budget" -gt 30 ]; then
  log "bench paper (budget ${budget}s)"
  timeout $((budget + 45)) $py -m uisps bench paper --preset full --data "npz:$data" --device cuda \
    --seeds 3 --order experiment --experiments main,ablation --out docs/results --time-budget "$budget"
fi
log "done"
tar czf "$out/results.tgz" docs/results

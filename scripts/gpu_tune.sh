#!/usr/bin/env bash
# One GPU call for issue #4: the `tune` experiment of `uisps bench paper` (UISPS pass settings side
# by side with Original and Retrain, 3 seeds), ResNet18 first, then AllCNN in the time left.
# EXPERIMENTS=main NAME=main: the main table (every method) instead, one architecture at a time.
# Each architecture writes its own folder, docs/results/<NAME>-<arch>/ (NAME: tune), packed into
# OUTDIR/<NAME>.tgz. VARIANTS=file.json: other preset overrides (e.g. their tune_variants), such as
# scripts/features-variants.json with NAME=features, scripts/reset-head-variants.json with NAME=reset,
# or scripts/reset-blocks-variants.json with NAME=blocks.
# Usage (repository root, on the GPU machine): scripts/gpu_tune.sh OUTDIR [TOTAL seconds]
# A CPU dry run: PRESET=quick DATA_SPEC=digits ARCHS=smallcnn SEEDS=1 DEVICE=cpu scripts/gpu_tune.sh /tmp 120
# Needs the CIFAR-10 subset at .gpudata/cifar10_subset.npz (or $UISPS_CIFAR10_SUBSET).
set -uo pipefail
out=${1:?usage: scripts/gpu_tune.sh OUTDIR [TOTAL seconds]}
total=${2:-530}
data=${UISPS_CIFAR10_SUBSET:-.gpudata/cifar10_subset.npz}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) [${SECONDS}s] $*"; }

nvidia-smi -L 2>/dev/null
$py -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
name=${NAME:-tune}
first=${FIRST_BUDGET:-$((total * 6 / 10))}
archs=(${ARCHS:-resnet18 allcnn})
for arch in "${archs[@]}"; do
  if [ "$arch" = "${archs[0]}" ]; then budget=$first; else budget=$((total - SECONDS - 45)); fi
  [ "$budget" -gt 20 ] || { log "no time left for $arch"; continue; }
  log "$name $arch (budget ${budget}s)"
  overrides=$($py -c 'import json, sys; d = json.load(open(sys.argv[1])) if sys.argv[1] else {}; d["tune_archs"] = d["archs"] = [sys.argv[2]]; print(json.dumps(d))' "${VARIANTS:-}" "$arch")
  timeout $((budget + 60)) $py -m uisps bench paper --preset "${PRESET:-full}" --data "${DATA_SPEC:-npz:$data}" \
    --device "$device" --seeds "${SEEDS:-3}" --experiments "${EXPERIMENTS:-tune}" --preset-json "$overrides" \
    --out "docs/results/$name-$arch" --time-budget "$budget"
done
log "done"
tar czf "$out/$name.tgz" docs/results/$name-*

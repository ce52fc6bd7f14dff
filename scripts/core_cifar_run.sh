#!/usr/bin/env bash
# The core engine on the real CIFAR-10 subset with ResNet18 (issue 2): Original, Retrain (without
# class 0, and without 0,1,2), and UISPS forgetting 0 and 0,1,2 with the paper's settings, both as
# one literal epoch (~40 steps here) and at the paper's step count (~350 steps: its one epoch of
# 45,000 retained images; ../shared/design.md, outside this repository), and (mode "plain") one
# epoch without the fast paths: fp32, one inversion batch per label, no CUDA graph.
# Usage: scripts/core_cifar_run.sh [cifar10_subset.npz] [epochs] [results folder] [device]
# MODES="epoch steps350 plain" chooses the UISPS runs; ARCH the network (resnet18); PYTHON the
# interpreter (default: the repository's .venv/bin/python when there is one, else python3).
set -euo pipefail
data="npz:${1:-${UISPS_CIFAR10_SUBSET:-../shared/data/cifar10_subset.npz}}"
epochs="${2:-20}"
out="${3:-docs/results/core-cifar}"
device="${4:-auto}"
ck="runs/$(basename "$out")"
arch="${ARCH:-resnet18}"
mkdir -p "$out" "$ck"
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$venv_python" ]]; then PYTHON="$venv_python"; else PYTHON=python3; fi
fi
uisps() { "$PYTHON" -m uisps "$@"; }
uisps train --dataset "$data" --arch "$arch" --epochs "$epochs" --lr 0.1 --device "$device" \
  --out "$ck/original.safetensors" > "$out/train-original.json"
for forget in 0 0,1,2; do
  tag=${forget//,/}
  uisps evaluate --checkpoint "$ck/original.safetensors" --dataset "$data" --forget $forget \
    --device "$device" --json > "$out/eval-original-f$tag.json"
  for mode in ${MODES:-epoch steps350}; do
    case $mode in
      # the paper's pass by name: `{}` is the service's default pass (350+ steps, cosine, another lr)
      epoch) params='{"preset": "paper"}' ;;
      steps350) params='{"preset": "paper", "steps": 350}' ;;
      plain) params='{"preset": "paper", "precision": "fp32", "inversion": {"batched": false, "cuda_graph": false}}' ;;
    esac
    uisps unlearn --checkpoint "$ck/original.safetensors" --dataset "$data" --forget $forget --device "$device" \
      --params "$params" --out "$ck/uisps-f$tag-$mode.safetensors" --report "$out/uisps-f$tag-$mode.json" > /dev/null
  done
  uisps train --dataset "$data" --arch "$arch" --epochs "$epochs" --lr 0.1 --exclude $forget --device "$device" \
    --out "$ck/retrain-f$tag.safetensors" > "$out/train-retrain-f$tag.json"
  uisps evaluate --checkpoint "$ck/retrain-f$tag.safetensors" --dataset "$data" --forget $forget \
    --device "$device" --json > "$out/eval-retrain-f$tag.json"
done
echo done

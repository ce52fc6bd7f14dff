#!/usr/bin/env bash
# The core engine on the real CIFAR-10 subset with ResNet18 (issue 2): Original, Retrain (without
# class 0, and without 0,1,2), and UISPS forgetting 0 and 0,1,2 with the paper's settings, both as
# one literal epoch (~40 steps here) and at the paper's step count (~350 steps, see design.md).
# Usage: scripts/core_cifar_run.sh [path to cifar10_subset.npz] [epochs]
set -euo pipefail
data="npz:${1:-${UISPS_CIFAR10_SUBSET:-../shared/data/cifar10_subset.npz}}"
epochs="${2:-20}"
out=docs/results/core-cifar
mkdir -p "$out" runs/core-cifar
ck=runs/core-cifar
uisps() { python -m uisps "$@"; }
uisps train --dataset "$data" --arch resnet18 --epochs "$epochs" --lr 0.1 --out $ck/original.safetensors > $out/train-original.json
uisps evaluate --checkpoint $ck/original.safetensors --dataset "$data" --forget 0 --json > $out/eval-original-f0.json
uisps evaluate --checkpoint $ck/original.safetensors --dataset "$data" --forget 0,1,2 --json > $out/eval-original-f012.json
for forget in 0 0,1,2; do
  tag=${forget//,/}
  for mode in epoch steps350; do
    params='{}'
    [ $mode = steps350 ] && params='{"steps": 350}'
    uisps unlearn --checkpoint $ck/original.safetensors --dataset "$data" --forget $forget \
      --params "$params" --out $ck/uisps-f$tag-$mode.safetensors --report $out/uisps-f$tag-$mode.json > /dev/null
  done
  uisps train --dataset "$data" --arch resnet18 --epochs "$epochs" --lr 0.1 --exclude $forget \
    --out $ck/retrain-f$tag.safetensors > $out/train-retrain-f$tag.json
  uisps evaluate --checkpoint $ck/retrain-f$tag.safetensors --dataset "$data" --forget $forget --json > $out/eval-retrain-f$tag.json
done
echo done

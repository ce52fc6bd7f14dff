#!/usr/bin/env bash
# Second, short GPU call: the CUDA-graph equality check (fp32) and the unlearning learning rate
# on the CIFAR-10 subset with ResNet18 (the paper's 0.002 did not forget in the first call).
# Usage (repository root, on the GPU machine): scripts/gpu_followup.sh OUTDIR
set -uo pipefail
out=${1:?}
data=${UISPS_CIFAR10_SUBSET:-.gpudata/cifar10_subset.npz}
py=${PYTHON:-python3}
res=docs/results/lr-sweep-cuda
mkdir -p $res runs/lr
export PYTHONUNBUFFERED=1
timeout 60 $py scripts/check_cuda_graph.py | tee docs/results/cuda-graph-check.json
timeout 60 $py -m uisps train --dataset "npz:$data" --arch resnet18 --epochs 30 --lr 0.1 --device cuda \
  --out runs/lr/original.safetensors > $res/train-original.json
for lr in 0.01 0.03; do
  for steps in 36 350; do
    timeout 40 $py -m uisps unlearn --checkpoint runs/lr/original.safetensors --dataset "npz:$data" --forget 0 \
      --device cuda --params "{\"lr\": $lr, \"steps\": $steps}" --out runs/lr/u.safetensors \
      --report $res/uisps-f0-lr$lr-steps$steps.json 2>/dev/null
  done
done
tar czf "$out/followup.tgz" docs/results/cuda-graph-check.json $res

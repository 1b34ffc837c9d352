#!/usr/bin/env bash
# Reproduce the CIFAR-100 table of TFD (Li et al., IJCNN 2022): ResNet-20 / ResNet-32 / WRN-16-2 / WRN-40-1, each as
# baseline, TFD (inter-layer Tf-FD) and TFD with label smoothing (TFD-dagger), with the reference code's settings:
# 240 epochs, SGD nesterov momentum 0.9, lr 0.1 x0.1 at epochs 150/180/210, weight decay 5e-4, batch 128,
# pad-4 random crop + horizontal flip, Tf-FD weight warm-up over 20 epochs.
#
#   bash benchmarks/cifar100.sh [DATA_DIR] [SEEDS]
#
# DATA_DIR holds CIFAR-100 as torchvision stores it (DATA_DIR/cifar-100-python/); on a machine with internet the
# first run downloads it there (--dataset-download). Results: output/cifar100/<model>-<method>-seed<N>/summary.csv.
# Reported by TFD (best of 3): ResNet-20 69.06 -> 70.56 (71.11 with LS), ResNet-32 71.14 -> 72.73 (73.22),
# WRN-16-2 73.26 -> 74.4 (75.0), WRN-40-1 71.98 -> 73.1 (74.02).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-./data/cifar100}
SEEDS=${2:-"0 1 2"}
mkdir -p "$DATA_DIR"

COMMON=(--dataset torch/cifar100 --data-dir "$DATA_DIR" --dataset-download --train-split train --val-split test
        --num-classes 100 --img-size 32 --mean 0.5071 0.4867 0.4408 --std 0.2675 0.2565 0.2761
        --epochs 240 --opt nesterov --momentum 0.9 --lr 0.1 --weight-decay 5e-4 -b 128 --warmup-epochs 0
        --sched multistep --decay-milestones 150 180 210 --decay-rate 0.1
        --pad-crop 4 --scale 1 1 --ratio 1 1 --color-jitter 0 --hflip 0.5 --smoothing 0
        -j 4 --checkpoint-hist 1 --output output/cifar100)
TFD=(--tffd inter --tffd-inter-weight 0.005 --tffd-warmup-epochs 20)

for model in cifar_resnet20 cifar_resnet32 cifar_wrn_16_2 cifar_wrn_40_1; do
  for seed in $SEEDS; do
    python train_timm_tffd.py "${COMMON[@]}" --model "$model" --seed "$seed" --experiment "$model-baseline-seed$seed"
    python train_timm_tffd.py "${COMMON[@]}" --model "$model" --seed "$seed" "${TFD[@]}" \
      --experiment "$model-tfd-seed$seed"
    python train_timm_tffd.py "${COMMON[@]}" --model "$model" --seed "$seed" "${TFD[@]}" --smoothing 0.1 \
      --experiment "$model-tfd-ls-seed$seed"
  done
done
python -m timm_tffd.plot output/cifar100/*-seed* --out output/cifar100/curves.png

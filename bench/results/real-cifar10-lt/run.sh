#!/usr/bin/env bash
# First real-image results: CIFAR-10-LT (IF 100) built from the CIFAR-10 JPEGs of ../shared/data, one short
# schedule shared by every method: 10 epochs of the main stage, warmup-cosine (1 warmup epoch), each method's
# official CIFAR preset otherwise (augmentation, batch, LR, weight decay), evaluated on the full test split.
#   python ../shared/data/unpack_cifar10_jpeg.py --out DATA      (once)
#   bash bench/results/real-cifar10-lt/run.sh DATA OUT [ce1|ce3|ncl|shike|ssd ...]
# RESUME=1 continues each run from OUT/<run>/<method>.pt where it stopped (train --resume).
set -euo pipefail
data=$1; out=$2; shift 2
common=(--dataset imagefolder --data-root "$data" --imb-factor 100 --epochs 10 --schedule warmup-cosine
        --warmup-epochs 1 --eval-every 5 --shot-rule strict)
[[ ${RESUME:-0} == 1 ]] && common+=(--resume)
for run in "$@"; do
  case $run in
    ce1) args=(--preset ncl-cifar10-lt --method ce --num-experts 1) ;;
    ce3) args=(--preset ncl-cifar10-lt --method ce --num-experts 3) ;;
    ncl) args=(--preset ncl-cifar10-lt) ;;
    shike) args=(--preset shike-cifar100-lt --crt-epochs 2) ;;
    ssd) args=(--preset ssd-cifar100-lt --ssd-slg-epochs 2 --ssd-sdl-epochs 10) ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
  python -m train "${args[@]}" "${common[@]}" --out "$out/$run" 2>&1 | tr '\r' '\n' | grep -v "^epoch [0-9]*/[0-9]*:" >> "$out/$run.log"
done

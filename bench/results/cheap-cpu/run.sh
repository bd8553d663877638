#!/usr/bin/env bash
# The cheap ensemble (INT8, tail-aware early exit) on today's checkpoints: every choice made on the calibration
# split, every accuracy scored on the evaluation split. Run from the repository root:
#   python ../shared/data/unpack_cifar10_jpeg.py --out DATA            (once: real CIFAR-10 as an ImageFolder tree)
#   bash bench/results/cheap-cpu/run.sh runs DATA [demo] [served] [cifar] [halves]
# RUNS (here `runs`, git-ignored) receives the checkpoints and model repositories; the committed files name them
# relative to the repository root.
set -euo pipefail
runs=$1; data=$2; shift 2
out=bench/results/cheap-cpu
cheap=(--batches 1,64 --budget-s 30)
for step in "$@"; do
  case $step in
    demo)  # the demo checkpoint: NCL, 3 x ResNet-8, ncl-synthetic, 24 epochs (what `python -m bench.demo` trains)
      [ -f "$runs/demo/train/ncl.pt" ] || python -m train --preset ncl-synthetic --out "$runs/demo/train"
      python -m bench.cheap --ckpt "$runs/demo/train/ncl.pt" --repository "$runs/cheap-demo" --out $out/demo "${cheap[@]}" ;;
    served)  # the same repository plus the fused ensemble and each expert, served by Triton (HTTP and gRPC)
      python -m export.onnx --ckpt "$runs/demo/train/ncl.pt" --out "$runs/cheap-demo" --max-batch 64
      python -m export.onnx --ckpt "$runs/demo/train/ncl.pt" --out "$runs/cheap-demo" --max-batch 64 --naive-ensemble
      python -m bench --ckpt "$runs/demo/train/ncl.pt" --repository "$runs/cheap-demo" --served --no-inprocess \
        --concurrency 1,4,16 --window-s 0.5 --client-processes 2 --batches 1 --out $out/demo-served ;;
    cifar)  # real CIFAR-10-LT (IF 100): CE, 3 x ResNet-8, balanced softmax, 40 epochs (2 of warm-up), 2 threads
      OMP_NUM_THREADS=2 python -m train --preset ncl-cifar10-lt --method ce --num-experts 3 --arch resnet8 \
        --balanced-softmax --dataset imagefolder --data-root "$data" --imb-factor 100 --epochs 40 \
        --schedule warmup-cosine --warmup-epochs 2 --eval-every 10 --shot-rule strict --workers 1 \
        --out "$runs/c10/ce3-r8-e40"
      python -m bench.cheap --ckpt "$runs/c10/ce3-r8-e40/ce.pt" --data-root "$data" --calib-per-class 500 \
        --repository "$runs/cheap-c10" --out $out/cifar10-lt-ce3-r8-e40 "${cheap[@]}" ;;
    halves)  # does auto's choice hold on images it was not chosen on? (both checkpoints above; split_half.json)
      python bench/results/cheap-cpu/split_half.py --ckpt "$runs/demo/train/ncl.pt" --out $out/demo
      python bench/results/cheap-cpu/split_half.py --ckpt "$runs/c10/ce3-r8-e40/ce.pt" --data-root "$data" \
        --out $out/cifar10-lt-ce3-r8-e40 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done

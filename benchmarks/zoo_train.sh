#!/usr/bin/env bash
# Trains every entry of the model zoo (issue 17) with the library's own commands, one after another, on one CPU
# thread each, into runs/zoo/<entry> (bestformer_tiny-mnist-ft fine-tunes bestformer_tiny-mnist with --init).
# `python benchmarks/zoo.py build` then packs the best checkpoints into src/bestformer/zoo/. Each command is recorded
# (shell-quoted) in runs/zoo/<entry>.command, and from there in the zoo's manifest as the entry's reproduction.
#   bash benchmarks/zoo_train.sh [ENTRY ...]     (default: all; ../shared/data must exist)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=runs/zoo
MNIST_OPTS="--dataset mnist --data-dir $DATA/mnist --time-steps 4 --epochs 1 --warmup-epochs 0.1 --lr 0.005 --warmup-lr 0.0005 --min-lr 0.00001 --batch-size 64 --seed 0"
declare -A CMD=(
  [bestformer_tiny-digits]="bestformer train --recipe digits --out $OUT --name bestformer_tiny-digits"
  [bestformer_tiny-mnist]="bestformer train --recipe mnist --data-dir $DATA/mnist --threads 1 --out $OUT --name bestformer_tiny-mnist"
  [bestformer_tiny-mnist-ft]="bestformer train --recipe mnist --data-dir $DATA/mnist --threads 1 --init runs/zoo/bestformer_tiny-mnist/best.safetensors --teacher runs/zoo/bestformer_tiny-mnist/teacher/best.safetensors --epochs 2 --warmup-epochs 0 --lr 0.001 --out $OUT --name bestformer_tiny-mnist-ft"
  [bestformer_tiny-nmnist]="bestformer train --recipe nmnist --data-dir $DATA/nmnist/nmnist-small.tar.gz --threads 1 --out $OUT --name bestformer_tiny-nmnist"
  [csd_tiny-mnist]="bestformer train --recipe none --model csd_tiny $MNIST_OPTS --threads 1 --out $OUT --name csd_tiny-mnist"
  [a2os2a_tiny-mnist]="bestformer train --recipe none --model a2os2a_tiny --model-arg neuron_kwargs={\"decay_input\":false} $MNIST_OPTS --threads 1 --out $OUT --name a2os2a_tiny-mnist"
  [qsd_tiny-mnist]="bestformer train --recipe none --model qsd_tiny $MNIST_OPTS --threads 1 --out $OUT --name qsd_tiny-mnist"
)
ORDER=(bestformer_tiny-digits bestformer_tiny-mnist bestformer_tiny-mnist-ft csd_tiny-mnist qsd_tiny-mnist a2os2a_tiny-mnist bestformer_tiny-nmnist)
[ $# -gt 0 ] && ORDER=("$@")
mkdir -p "$OUT"
for entry in "${ORDER[@]}"; do
  cmd=${CMD[$entry]:?unknown entry $entry}
  echo "== $entry: $cmd"
  start=$(date +%s)
  $cmd > "$OUT/$entry.log" 2>&1
  echo "   done in $(( $(date +%s) - start )) s"
  python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' $cmd > "$OUT/$entry.command"  # copy-pastable
done

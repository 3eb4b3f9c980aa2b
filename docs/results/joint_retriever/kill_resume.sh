#!/bin/bash
# Real kill -9 test of `lmforge retrieval train-retriever` with the RETRO scorer:
#   bash docs/results/joint_retriever/kill_resume.sh RUN DATA
# RUN: a trained RETRO run (e.g. runs/retro_demo), DATA: its prepared data (e.g. data/demo).
# Runs 60 steps once whole and once killed with SIGKILL after step 34 (checkpoint at 30), resumed
# with --resume auto; prints whether all logged losses are identical. Works in a new temporary folder.
set -eu
RUN=${1:?usage: kill_resume.sh RUN DATA}; DATA=${2:?usage: kill_resume.sh RUN DATA}
LMFORGE=${LMFORGE:-lmforge}; PYTHON=${PYTHON:-python}
export LMFORGE_PROGRESS=0 OMP_NUM_THREADS=1
K=$(mktemp -d -t joint_killtest.XXXXXX)
ARGS="$RUN --data $DATA --retrievers joint --seeds 0 --train-entities 60 --eval-entities 20 --steps 60 --refresh-every 15 --checkpoint-every 10"
$LMFORGE retrieval train-retriever $ARGS --out $K/whole > $K/whole.log 2>&1
$LMFORGE retrieval train-retriever $ARGS --out $K/killed > $K/killed1.log 2>&1 &
PID=$!
M=$K/killed/seed0/joint/metrics.jsonl
until [ -f $K/killed/seed0/joint/checkpoints/step_0000030.pt ] && grep -q '"step": 34,' $M 2>/dev/null; do
  if ! kill -0 $PID 2>/dev/null; then echo "ended before kill"; exit 1; fi; sleep 0.05; done
kill -9 $PID; wait $PID || true; echo "killed at $(grep -c '"kind": "train"' $M) logged steps"
ls $K/killed/seed0/joint/checkpoints $K/killed/seed0/joint/index
$LMFORGE retrieval train-retriever $ARGS --out $K/killed > $K/killed2.log 2>&1
$PYTHON - "$K" <<'PY'
import sys
from lmforge.retrieval.joint import read_losses
a = read_losses(f"{sys.argv[1]}/whole/seed0/joint")
b = read_losses(f"{sys.argv[1]}/killed/seed0/joint")
print("steps", len(a), len(b), "identical:", a == b, "max abs diff", max(abs(x[1]-y[1]) for x, y in zip(a, b)))
print("first/last KL", a[0], a[-1])
PY
grep -h "resumed" $K/killed2.log
echo "files: $K"

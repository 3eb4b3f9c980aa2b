#!/bin/bash
# Real kill -9 test of `lmforge retrieval train-retriever` with the RETRO scorer.
cd /work/main
export LMFORGE_PROGRESS=0 OMP_NUM_THREADS=1
K=/tmp/joint_retriever/killtest
ARGS="/tmp/joint_retriever/model/kw_retro --data /tmp/joint_retriever/demo --retrievers joint --seeds 0 --train-entities 60 --eval-entities 20 --steps 60 --refresh-every 15 --checkpoint-every 10"
rm -rf $K/whole $K/killed
.venv/bin/lmforge retrieval train-retriever $ARGS --out $K/whole > $K/whole.log 2>&1
.venv/bin/lmforge retrieval train-retriever $ARGS --out $K/killed > $K/killed1.log 2>&1 &
PID=$!
M=$K/killed/seed0/joint/metrics.jsonl
until [ -f $K/killed/seed0/joint/checkpoints/step_0000030.pt ] && grep -q '"step": 34,' $M 2>/dev/null; do
  if ! kill -0 $PID 2>/dev/null; then echo "ended before kill"; exit 1; fi; sleep 0.05; done
kill -9 $PID; wait $PID; echo "killed rc=$? at $(grep -c '"kind": "train"' $M) logged steps"
ls $K/killed/seed0/joint/checkpoints $K/killed/seed0/joint/index
.venv/bin/lmforge retrieval train-retriever $ARGS --out $K/killed > $K/killed2.log 2>&1
.venv/bin/python - <<'PY'
from lmforge.retrieval.joint import read_losses
a = read_losses("/tmp/joint_retriever/killtest/whole/seed0/joint")
b = read_losses("/tmp/joint_retriever/killtest/killed/seed0/joint")
print("steps", len(a), len(b), "identical:", a == b, "max abs diff", max(abs(x[1]-y[1]) for x, y in zip(a, b)))
print("first/last KL", a[0], a[-1])
PY
grep -h "resumed" $K/killed2.log

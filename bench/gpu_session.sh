#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md ("GPU") asks for, in one call of at most ~8 minutes, for a
# session that is lent a device (an H100/H200 with PyTorch and transformers installed, nothing
# fetched: lmforge runs from src/ without being installed). Each part has its own time limit, so
# one that fails or hangs costs its limit (90 + 2 x (150 + 40) s at most) and the rest still run; the
# exit status is non-zero when any part failed.
#
#   bash bench/gpu_session.sh [OUT_DIR]          (default: $OUT, else gpu_results)
#
# Writes into OUT_DIR: versions.txt, pytest_gpu.txt (tests/test_gpu.py: bf16, compile, CUDA
# parity), throughput_{dense,moe}.json (bench/train_throughput.py: the ~124M dense model and the
# 8-expert top-2 MoE, bf16, torch.compile, against Hugging Face Llama / Mixtral in the same process,
# MFU against the vendor's bf16 peak), decode_{dense,moe}.json (bench/decode.py: batch-1 greedy
# decode tokens/s against the measured memory-bandwidth bound), and a .err file beside each JSON.
# On a machine without CUDA it stops at once (SMOKE=1 runs every part on the CPU, tiny, to check
# the script itself).
set -u
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LMFORGE_PROGRESS=0
python=${PYTHON:-python3}

if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu; compile=""; limit=120
  common=(--set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2)
  shape=("${common[@]}" --batch-size 2 --seq-len 64 --steps 1 --rounds 1 --warmup 1)
  decode=("${common[@]}" --new-tokens 16 --rounds 2 --dtype fp32)
else
  if ! $python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device here: nothing measured (SMOKE=1 checks the script on the CPU)" | tee "$out/versions.txt"
    exit 1
  fi
  # GPT-2's padded vocabulary: the dense config is then ~124M parameters
  device=cuda; compile="--compile"; limit=150; common=()
  shape=(--vocab-size 50304 --batch-size 16 --seq-len 1024 --steps 10 --rounds 3 --warmup 3)
  decode=(--vocab-size 50304 --new-tokens 256 --rounds 5 --dtype bf16)
fi

failed=0
part() {  # part NAME LIMIT_S OUT ERR COMMAND...: run with a time limit into OUT / ERR, report, count failures
  local name=$1 seconds=$2 stdout=$3 stderr=$4; shift 4
  timeout -k 5 "$seconds" "$@" > "$stdout" 2> "$stderr"
  local status=$?
  echo "$name: exit $status"
  [ $status -eq 0 ] || failed=$((failed + 1))
}

$python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" > "$out/versions.txt" 2>&1
if [ "${SMOKE:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >> "$out/versions.txt" 2>&1
  part "gpu tests" 90 "$out/pytest_gpu.txt" "$out/pytest_gpu.err" $python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
fi
# the MoE config's expert width; the dense config has none
moe_shape=(); [ "${SMOKE:-0}" = 1 ] && moe_shape=(--set model.moe.d_expert=64)
for model in dense moe; do
  extra=(); [ "$model" = moe ] && extra=(${moe_shape[@]+"${moe_shape[@]}"})
  part "throughput $model" $limit "$out/throughput_$model.json" "$out/throughput_$model.err" \
      $python bench/train_throughput.py --config "configs/bench_gpu_$model.yaml" \
      --device $device $compile --precision bf16 "${shape[@]}" ${extra[@]+"${extra[@]}"}
  part "decode $model" 40 "$out/decode_$model.json" "$out/decode_$model.err" \
      $python bench/decode.py --config "configs/bench_gpu_$model.yaml" --device $device \
      "${decode[@]}" ${extra[@]+"${extra[@]}"}
done
echo "$failed part(s) failed"
exit $((failed > 0))

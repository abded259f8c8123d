#!/bin/bash
# Several training runs side by side on one GPU (small students leave an H100/H200 mostly idle), each a
# scripts/train_sweep.py call; rows to $OUT/results.jsonl, log tails to $OUT/logs.txt. How the issue-6
# attempts were run on the lent GPU machine, where the teacher cannot travel (only its PCA targets do).
#
#   bash scripts/gpu_sweep.sh NAME:CONFIG[:OVERRIDES[:TEACHER_NPY[:DATA_ROOT]]] ...
#   e.g. bash scripts/gpu_sweep.sh base:configs/bi_mixsp_hard.yaml:seed=2 \
#            sim:configs/bi_mixsp_hard.yaml:loss.distill_sim=10,seed=2
#
# OVERRIDES: comma-joined KEY=VALUE. Environment: ENCODER (student base folder; default: the fp32 copy made
# from the fp16 one carried in .device/minilm16), TEACHER (corpus-aligned teacher rows, scripts/teacher_targets.py),
# DATA_ROOT (pairs/ + corpus/, default .device/data), LIMIT (seconds per run), DEVICE (default cuda),
# OUT (default /tmp/gpu_sweep), RUNS (run directories, default /tmp/gpu_sweep_runs).
# Then `mixsp soup RUN_DIR...` (run dirs: $RUNS/NAME/<config name>) merges runs of one seed.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/gpu_sweep}; RUNS=${RUNS:-/tmp/gpu_sweep_runs}; mkdir -p "$OUT" "$RUNS"
if [ -z "${ENCODER:-}" ]; then
  ENCODER=/tmp/minilm32
  python3 - <<'PY'
import shutil
from safetensors.torch import load_file, save_file
shutil.copytree(".device/minilm16", "/tmp/minilm32", dirs_exist_ok=True)
state = load_file(".device/minilm16/model.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()},
          "/tmp/minilm32/model.safetensors", metadata={"format": "pt"})
PY
fi
pids=()
for spec in "$@"; do
  IFS=: read -r name config overrides teacher root <<<"$spec"
  sets=(--set "model.encoder=$ENCODER" --set "train.device=${DEVICE:-cuda}")
  IFS=, read -ra extra <<<"${overrides:-}"
  for o in "${extra[@]}"; do [ -n "$o" ] && sets+=(--set "$o"); done
  teacher=${teacher:-${TEACHER:-.device/teacher_pca128.npy}}
  teacher_args=()  # recipes without a teacher term run without one (train_sweep refuses a config that needs it)
  [ -f "$teacher" ] && teacher_args=(--teacher-npy "$teacher")
  timeout "${LIMIT:-540}" python3 scripts/train_sweep.py "$config" --out "$RUNS/$name" \
      --data-root "${root:-${DATA_ROOT:-.device/data}}" "${teacher_args[@]}" \
      --no-tracking "${sets[@]}" > "$RUNS/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for spec in "$@"; do
  name=${spec%%:*}
  if [ -f "$RUNS/$name/results.jsonl" ]; then sed "s/^{/{\"run\": \"$name\", /" "$RUNS/$name/results.jsonl" >> "$OUT/results.jsonl"
  else echo "$name: no result (see $RUNS/$name.log)"; fi
  { echo "== $name"; grep -av "it/s\]\|s/it\]" "$RUNS/$name.log" | tail -15; } >> "$OUT/logs.txt"
done
cat "$OUT/results.jsonl"

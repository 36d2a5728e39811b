#!/usr/bin/env bash
# DDP on the CPU (gloo): `accelerate launch` with 2 processes gives the loss curve of 1 process.
#   bash bench/distill_ddp_cpu.sh [WORKDIR]
# (accelerate's own multi-CPU launcher wants MPI; --multi_gpu on a machine without GPUs runs
# torchrun, and the Accelerator falls back to the CPU with the gloo backend.)
set -euo pipefail
W=${1:-/tmp/distill-ddp}
rm -rf "$W" && mkdir -p "$W"
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
python - "$W" <<'PY'
import sys
from pathlib import Path
from moecompress.testing import SAMPLE_TEXT, tiny_checkpoint
w = Path(sys.argv[1])
tiny_checkpoint(w / "teacher", "qwen3_moe", seed=0)
tiny_checkpoint(w / "student", "qwen3_moe", seed=1)
(w / "data.txt").write_text(SAMPLE_TEXT * 3)
PY
ARGS=("$W/student" --teacher "$W/teacher" --data "$W/data.txt" --steps 4 --seq-len 32 --batch-size 4 --lr 3e-3 --warmup 0)
python -m moecompress distill "${ARGS[@]}" -o "$W/one"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m moecompress distill "${ARGS[@]}" -o "$W/two"
python - "$W" <<'PY'
import json, sys
w = sys.argv[1]
one, two = ([r["loss"] for r in json.load(open(f"{w}/{d}/loss_curve.json"))["steps"]] for d in ("one", "two"))
procs = json.load(open(f"{w}/two/moecompress.json"))["num_processes"]
print("1 process :", one)
print(f"{procs} processes:", two)
print("max |difference|:", max(abs(a - b) for a, b in zip(one, two)))
PY

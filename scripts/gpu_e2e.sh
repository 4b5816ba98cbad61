#!/usr/bin/env bash
# The end-to-end GPU benchmark, in one go (about 8 minutes on an H200 with 16 cores):
#   real Ogg/Opus WebSocket clients at real time (several load-generator processes, starts spread) against
#   `kyutai-stt serve` with a random stt-1b checkpoint (bf16), --workers 1 and --workers $WORKERS; for each, the
#   largest client count with p99 word latency <= 200 ms beyond the model delay and no frame lost.
# Results: $OUT/e2e.json as they come, logs in $OUT/e2e-logs/, a table on stdout (also $OUT/e2e.md).
#
#   bash scripts/gpu_e2e.sh                       # from the repository root
#   CKPT=/tmp/ck_1b WORKERS=10 bash scripts/gpu_e2e.sh
#
# Set-up (the wheels the GPU machine lacks, from $WHEELS): scripts/gpu_env.sh.
set -uo pipefail
DEADLINE_S=${DEADLINE_S:-470}
CKPT=${CKPT:-/tmp/ck_1b}
CORES=$(nproc)
LOADGEN=${LOADGEN:-4}
WORKERS=${WORKERS:-$(( CORES - LOADGEN - 2 > 1 ? CORES - LOADGEN - 2 : 2 ))}  # cores left after engine and clients
source "$(dirname "$0")/gpu_env.sh"  # $OUT, the wheels, PYTHONPATH, $OUT/gpu.txt
left=$(( DEADLINE_S - ($(date +%s) - start) ))
# 1152 slots x 101.6 MiB of stt-1b state per stream fits an H200 (about 1300 would); 1024+ is the target.
timeout --signal=INT --kill-after=20 "$left" python3 scripts/bench_frontend.py \
  --model "$CKPT" --make-checkpoint 1b --device cuda --dtype bfloat16 \
  --workers "1,$WORKERS" --clients-start 512 --clients-max "${CLIENTS_MAX:-1152}" --resolution 128 \
  --seconds 12 --ramp 4 --loadgen-procs "$LOADGEN" --deadline-s $(( left - 25 )) --startup-timeout 240 \
  --out "$OUT/e2e.json" | tee "$OUT/e2e.md"
echo "exit $? after $(( $(date +%s) - start )) s; results in $OUT"

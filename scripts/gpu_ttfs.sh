#!/usr/bin/env bash
# The TTFS benchmark on a lent GPU, in one go (sized for about 5 minutes on an H100 or H200 with 16 cores):
#   a random stt-1b checkpoint (bf16), `kyutai-stt serve --slots $SLOTS --workers $WORKERS`, then 1 / 64 / 256 / 512
#   concurrent sessions of the light Deepgram and OpenAI Realtime clients (the same method as the Pipecat pipeline:
#   real speech at real time in 20 ms chunks, finalize at Pipecat's Silero VAD stop from scripts/ttfs_plan.json;
#   the GPU machine has no Pipecat), $PROCS load-generator processes. Prints whether issue 19's GPU target holds
#   (TTFS p99 <= 0.30 s with one session and at half the capacity, $SLOTS / 2 sessions).
# Results: $OUT/ttfs-gpu.json and $OUT/ttfs-gpu.md, the server's log in $OUT.
#
#   bash scripts/gpu_ttfs.sh                       # from the repository root
#   CKPT=/tmp/ck_1b CLIENTS=1,64 bash scripts/gpu_ttfs.sh
#   LANE_SLOTS=0 bash scripts/gpu_ttfs.sh          # without the lanes (KYUTAI_STT_LANE_SLOTS), to compare
#
# Set-up (the wheels the GPU machine lacks, from $WHEELS): scripts/gpu_env.sh.
set -uo pipefail
DEADLINE_S=${DEADLINE_S:-420}
CKPT=${CKPT:-/tmp/ck_1b}
SLOTS=${SLOTS:-512}
CLIENTS=${CLIENTS:-1,64,256,512}
PROTOCOLS=${PROTOCOLS:-deepgram,realtime}
TURNS=${TURNS:-5}
PROCS=${PROCS:-6}
WORKERS=${WORKERS:-6}
# the largest lane's rows (lanes of 1, 2, 4: the server's KYUTAI_STT_LANE_SLOTS; the server inherits this environment)
export KYUTAI_STT_LANE_SLOTS=${LANE_SLOTS:-${KYUTAI_STT_LANE_SLOTS:-4}}
echo "lanes up to $KYUTAI_STT_LANE_SLOTS rows"
source "$(dirname "$0")/gpu_env.sh"  # $OUT, the wheels, PYTHONPATH, $OUT/gpu.txt
left=$(( DEADLINE_S - ($(date +%s) - start) ))
TTFS_LOG_DIR="$OUT" timeout --signal=INT --kill-after=20 "$left" python3 scripts/ttfs_bench.py run \
  --model "$CKPT" --make-checkpoint 1b --device cuda --dtype bfloat16 --slots "$SLOTS" --workers "$WORKERS" \
  --clients "$CLIENTS" --protocols "$PROTOCOLS" --utterances "$TURNS" --procs "$PROCS" --ramp 2 \
  --startup-timeout 240 --out "$OUT/ttfs-gpu.json" | tee "$OUT/ttfs-gpu.md"
echo "exit $? after $(( $(date +%s) - start )) s; results in $OUT"

# Sourced by the GPU scripts (gpu_e2e.sh, gpu_ttfs.sh): the one set-up of a lent GPU machine.
# The machine's python3 lacks some server dependencies (scripts/gpu_wheels.sh fetches them): the wheels in $WHEELS
# (default shared/wheels) go to a private folder on PYTHONPATH, beside the repository. Sets OUT (created), start
# (the clock of the script's deadline) and writes the GPU's name to $OUT/gpu.txt.
OUT=${OUT:-${OUT_DIR:-$PWD/gpu-out}}
WHEELS=${WHEELS:-shared/wheels}
mkdir -p "$OUT"
start=$(date +%s)
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --target /tmp/kyutai-deps "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/kyutai-deps:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

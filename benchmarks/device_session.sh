#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool): install the carried pydantic wheels, decode CIFAR-10
# into /tmp/cifar10, then run each argument as a shell command, logging to $OUT. See ../shared/GPU.md.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1
python3 .gpu/data/prepare.py /tmp/cifar10 > /dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
i=0
for cmd in "$@"; do
  i=$((i + 1))
  echo "=== [$i] $cmd"
  start=$(date +%s)
  bash -c "$cmd" 2>&1 | tee "${OUT:-/tmp}/step$i.log" | tail -n 40
  echo "=== [$i] rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
done

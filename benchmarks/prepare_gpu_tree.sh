#!/usr/bin/env bash
# Builds .gpu/ in this checkout, what an offline GPU machine needs beside the tree (../shared/GPU.md): the
# CIFAR-10 archives and their decoder (.gpu/data), pydantic's wheels for the machine's Python 3.12 (.gpu/wheels,
# installed by benchmarks/reference.sh when pydantic is missing) and the AutoAttack authors' package, pure Python
# (.gpu/site, put on PYTHONPATH by the same script). Run it once per checkout, before a device call that carries
# .gpu; it needs ../shared and the package registry, not a GPU. ~21 MiB.
#
#   bash benchmarks/prepare_gpu_tree.sh            # then: run(..., carry=[".gpu"])
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
[ -d "$SHARED/data" ] || { echo "no $SHARED/data: give SHARED=<folder holding data/ and GPU.md>" >&2; exit 2; }
git check-ignore -q .gpu || echo '/.gpu/' >> .git/info/exclude  # never committed
rm -rf .gpu/data .gpu/site && mkdir -p .gpu/wheels .gpu/site && cp -r "$SHARED/data" .gpu/data
# pydantic 2.14.4 needs exactly pydantic-core 2.50.5 (../shared/GPU.md)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection 'typing-extensions>=4.16'
python3 -m pip install -q --no-deps --no-compile --target .gpu/site pyautoattack
rm -rf .gpu/site/pyautoattack/examples  # a 44-MiB test model: the tree travels in at most 64 MiB
echo "prepared .gpu: $(du -sh .gpu | cut -f1), $(ls .gpu/wheels | wc -l) wheels, $(ls .gpu/site | tr '\n' ' ')"

#!/usr/bin/env bash
# The wheels that the lent accelerator machines lack, for their Python 3.12 on x86-64, into
# .whl/ (ignored by git; the device tool carries it). Those machines have JAX, Flax, Optax,
# Orbax, PyTorch, pytest and chex, but not ml_collections (every config), grain (the JAX
# input pipeline) or grain's array_record and portpicker.
#
#   bash benchmarks/device_wheels.sh
#
# then, on the device, from the repository root (carry: .whl), the one device command:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
#     && python3 benchmarks/device_check.py --out $OUT/device_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
ls -la .whl

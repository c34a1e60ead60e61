#!/usr/bin/env bash
# The small pure-Python / manylinux wheels benchmarks/gpu_check.py needs beyond a bare GPU image (Python 3.12,
# torch with CUDA, numpy, Pillow): downloaded here, where PyPI is reachable, into gpu_wheels/ (git-ignored), at the
# versions requirements.txt pins. They travel with the working tree; on the GPU machine they are unpacked into a
# temporary folder (no pip and no network needed there):
#
#   for w in gpu_wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/facescale-deps; done
#   PYTHONPATH=/tmp/facescale-deps python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
pins=()
for name in pydantic PyYAML webdataset simplejpeg tqdm; do
  pins+=("$(grep -E "^${name}==" requirements.txt)")
done
rm -rf gpu_wheels && mkdir gpu_wheels
.venv/bin/pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PY_VERSION" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d gpu_wheels "${pins[@]}" braceexpand
rm -f gpu_wheels/numpy-*.whl  # the image's own numpy stays (its torch was built against it)
ls -la gpu_wheels
du -sh gpu_wheels

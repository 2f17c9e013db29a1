#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with every wheel benchmarks/gpu_wheels.txt lists, for a GPU
# machine with no package index (Python 3.12, x86-64, CUDA 13; its image has torch, CuPy,
# xarray, pyarrow and the rest that the list's "# image:" lines name). Run here, from
# anywhere in the repository, where pip reaches PyPI:
#
#   bash benchmarks/gpu_wheels.sh
#
# It downloads the pinned wheels (no dependencies: the list is the closure), removes any
# other version of a listed package already in .whl/, checks the whole closure (every
# requirement of every wheel is a wheel there or in the image: benchmarks/_wheels.py) and
# writes .whl/install.sh. About 58 MB (nvCOMP's wheel without its command-line tool and
# headers: the device call carries 64 MiB at most, the working tree included): name .whl
# in the device call's carry. There, from the project root:
#
#   source .whl/install.sh && bash benchmarks/gpu_acceptance.sh
#
# ../shared/tools/device-wheels.sh $(grep -v '^#' benchmarks/gpu_wheels.txt) downloads these
# too, but beside its own unpinned list (dask, partd, attrs, ...), whose newer versions
# would sit beside these pins: two versions of one package stop the whole install. Running
# this script after it removes them (and checks what is left).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
# shellcheck disable=SC2046
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d .whl $(grep -v '^#' benchmarks/gpu_wheels.txt) \
  2>&1 | grep -v '^WARNING' || true
"$PY" benchmarks/_wheels.py dedupe .whl
"$PY" benchmarks/_wheels.py slim .whl | tail -n 1
"$PY" benchmarks/_wheels.py check .whl
cat > .whl/install.sh <<'INNER'
# Sourced on the GPU machine from the project root: the wheels into /tmp/xclay-site, first on
# the path (before the image's own packages), with the project itself.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/xclay-site .whl/*.whl || return 1
export PYTHONPATH="/tmp/xclay-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
INNER
du -sh .whl

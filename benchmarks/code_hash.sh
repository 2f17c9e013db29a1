#!/usr/bin/env bash
# A hash of the code benchmark results depend on: the package, the benchmarks (results
# excluded), the tests and pyproject.toml. The same with or without git (a GPU machine gets
# a copy of the tree without .git), so a result can say which code produced it and the
# acceptance script can tell a step already done for this code from one to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
find pyproject.toml xclay benchmarks tests -type f \
  \( -name '*.py' -o -name '*.sh' -o -name '*.txt' -o -name '*.npz' -o -name '*.toml' \
     -o -name '*.json' -o -name '*.yaml' -o -name '*.yml' \) \
  -not -path 'benchmarks/results/*' -not -path '*/__pycache__/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -c1-12

#!/usr/bin/env bash
# Downloads into .whl/ the Python 3.12 wheels that the GPU image lacks (grain, ml_collections and what they need
# beyond the image), for `device run` with carry [".whl"]. Run from the repo root on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -q '^/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in grain==0.2.18 ml_collections==1.1.0 array_record==0.8.6 tensorboardX==2.6.5 tqdm==4.70.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$pkg"
done
ls -la .whl

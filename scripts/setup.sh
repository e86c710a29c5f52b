#!/usr/bin/env bash
# Make .venv with the tracker's dependencies; with --test also the test tools and the Debian
# packages the tests run against (redis-server, shellcheck). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  requirements="requirements-test.txt"
else
  requirements=requirements.txt
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. The version is the one
# the images ship (tests/test_packaging.py checks). TORCH_SPEC picks another build of it, e.g. on
# a CUDA machine: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
read -ra torch_spec <<< "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" "${torch_spec[@]}"
"${pip[@]}" -r "$requirements"
# sam2 without its dependencies: its torchvision pin serves only the image predictor, and
# PyPI's torchvision does not import beside a CPU torch. No CUDA toolkit: skip the extension.
if ! .venv/bin/python -c "import sam2" 2>/dev/null; then
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps --no-build-isolation sam2==1.1.0
fi

#!/usr/bin/env bash
# The GPU check, in one command, on any Linux machine with an NVIDIA GPU, a CUDA build of torch
# and nvcc:
#   1. builds sam2 1.1.0 with its CUDA extension against this machine's torch (failing if the
#      extension does not build), plus the few Python packages the tests need that are missing;
#   2. runs the exactness tests on CUDA: the function (bf16 autocast, real store and codec) vs the
#      official SAM2VideoPredictor under bf16 autocast, identical masks required;
#   3. runs the benchmarks on CUDA and writes bench/results/gpu.json (handler vs official, image
#      size 1024, 1/4/16 objects), gpu-worst-case.json (the large model, 128 objects, a 4K frame:
#      what eventTimeout must cover) and batching.json, batching-small.json (objects batched
#      through one track_step: measured, not used).
# Without a CUDA device it says so and exits 0: CI machines have none.
#
#   scripts/gpu-check.sh [--wheels DIR] [--quick]
#     --wheels DIR  install from DIR only (an offline machine: bring sam2's sdist and the wheels)
#     --quick       the exactness tests only, no benchmarks
# PYTHON picks the interpreter (default python3); packages go to .gpu-check/site, not into it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
wheels=""
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$(realpath "$2"); shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "usage: $0 [--wheels DIR] [--quick]" >&2; exit 2 ;;
  esac
done

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: skipped, $python has no torch that sees a CUDA device (nothing was run)"
  exit 0
fi

site="$PWD/.gpu-check/site"
mkdir -p "$site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
pip=("$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --target "$site")
[ -z "$wheels" ] || pip+=(--no-index --find-links "$wheels")

# What the function and the tests import, where this interpreter lacks it (module=requirement).
needed=()
for pair in hydra=hydra-core==1.3.2 omegaconf=omegaconf==2.3.0 antlr4=antlr4-python3-runtime==4.9.3 \
            iopath=iopath==0.1.10 portalocker=portalocker redis=redis==7.4.1 nuclio_sdk=nuclio-sdk==0.6.3 \
            msgpack=msgpack cv2=opencv-python-headless PIL=pillow tqdm=tqdm pytest=pytest \
            cvat_sdk=cvat-sdk==2.80.0 platformdirs=platformdirs dateutil=python-dateutil urllib3=urllib3 \
            attrs=attrs packaging=packaging; do
  "$python" -c "import ${pair%%=*}" 2>/dev/null || needed+=("${pair#*=}")
done
if [ "${#needed[@]}" -gt 0 ]; then
  echo "gpu-check: installing ${needed[*]}"
  "${pip[@]}" "${needed[@]}"
fi

# sam2 with its extension, for this GPU's architecture. SAM2_BUILD_ALLOW_ERRORS=0: a failed
# extension build fails here instead of installing sam2 without hole filling.
arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! "$python" -c "import torch, sam2._C" 2>/dev/null; then
  echo "gpu-check: building sam2 1.1.0 with its CUDA extension for sm_${arch/./} (nvcc: $(command -v nvcc || echo none))"
  TORCH_CUDA_ARCH_LIST="$arch" SAM2_BUILD_CUDA=1 SAM2_BUILD_ALLOW_ERRORS=0 "${pip[@]}" --no-binary sam2 sam2==1.1.0
fi
"$python" - <<'EOF'
import torch, sam2._C
print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"sam2 extension {sam2._C.__file__}")
EOF

export PYTHONUNBUFFERED=1
echo "gpu-check: exactness on CUDA"
"$python" -m pytest -p no:cacheprovider -q -rs tests/test_cuda_path.py "tests/test_exactness.py" -k "cuda or not exactness"

[ "$quick" -eq 1 ] && exit 0
echo "gpu-check: benchmarks on CUDA"
"$python" bench/bench_handler.py --device cuda --sizes 1024 --objects 1 4 16 --frames 32
"$python" bench/bench_handler.py --device cuda --sizes 1024 --objects 128 --frame-size 3840 2160 --frames 18 \
  --config configs/sam2.1/sam2.1_hiera_l.yaml --no-official --out bench/results/gpu-worst-case.json
"$python" bench/bench_batching.py --device cuda --objects 16 --size 1024 --frames 32
"$python" bench/bench_batching.py --device cuda --objects 4 --size 256 --frame-size 160 120 --seed 0 --frames 24 \
  --out bench/results/batching-small.json
echo "gpu-check: done; results in bench/results/gpu.json, gpu-worst-case.json, batching.json and batching-small.json"

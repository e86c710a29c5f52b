#!/usr/bin/env bash
# Deploy the SAM2 tracker to Nuclio for CVAT, the way CVAT's serverless/deploy_cpu.sh does, with
# the model size, the Redis/Kvrocks address and the platform (local Docker or Kubernetes) to
# choose. deploy_gpu.sh runs this script with --gpu. Run with --help for the options.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
Usage: deploy_cpu.sh [options]     CPU build (function.yaml)
       deploy_gpu.sh [options]     GPU build (function-gpu.yaml)

Build the SAM2 tracker's image and deploy it to Nuclio, in project "cvat".

  --model VARIANT         SAM2.1 size: tiny (default), small, base+ or large. Its weights are
                          baked into the image and it becomes SAM2_MODEL_ID.
  --redis-host HOST       Redis/Kvrocks holding the tracking state
                          (default: $CVAT_FUNCTIONS_REDIS_HOST, else cvat_redis_ondisk)
  --redis-port PORT       (default: $CVAT_FUNCTIONS_REDIS_PORT, else 6666)
  --redis-password PW     (default: $CVAT_FUNCTIONS_REDIS_PASSWORD, else none)
  --env NAME=VALUE        any other setting of the README's tables, e.g. SAM2_REDIS_URL=rediss://...
                          or SAM2_REDIS_SENTINELS=...; repeat for several
  --volume HOST:PATH      mount a host file or folder into the function, e.g. TLS certificates or
                          a password file for SAM2_REDIS_PASSWORD_FILE; repeat for several
                          (a host path: on Kubernetes, mount secrets as the README shows)
  --platform local|kube   local Docker, as with CVAT's docker compose (default), or Kubernetes
  --network NAME          local: CVAT's Docker network (default: cvat_cvat)
  --namespace NS          kube: the namespace Nuclio runs in (default: nuclio)
  --registry URL          kube: registry the image is pushed to (default: $NUCTL_REGISTRY)
  --run-registry URL      kube: registry the cluster pulls from, if it differs
                          (default: $NUCTL_RUN_REGISTRY, else --registry)
  --gpu                   deploy function-gpu.yaml (what deploy_gpu.sh does)
  -h, --help              show this help
EOF
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

function_file=function.yaml
model=tiny
redis_host="${CVAT_FUNCTIONS_REDIS_HOST:-cvat_redis_ondisk}"
redis_port="${CVAT_FUNCTIONS_REDIS_PORT:-6666}"
redis_password="${CVAT_FUNCTIONS_REDIS_PASSWORD:-}"
platform=local
network=cvat_cvat
namespace=nuclio
registry="${NUCTL_REGISTRY:-}"
run_registry="${NUCTL_RUN_REGISTRY:-}"
extra_args=()

need_value() {
  [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --gpu) function_file=function-gpu.yaml; shift ;;
    --model) need_value "$@"; model="$2"; shift 2 ;;
    --redis-host) need_value "$@"; redis_host="$2"; shift 2 ;;
    --redis-port) need_value "$@"; redis_port="$2"; shift 2 ;;
    --redis-password) need_value "$@"; redis_password="$2"; shift 2 ;;
    --platform) need_value "$@"; platform="$2"; shift 2 ;;
    --network) need_value "$@"; network="$2"; shift 2 ;;
    --namespace) need_value "$@"; namespace="$2"; shift 2 ;;
    --registry) need_value "$@"; registry="$2"; shift 2 ;;
    --run-registry) need_value "$@"; run_registry="$2"; shift 2 ;;
    --env)
      need_value "$@"
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE, not '$2'"
      extra_args+=(--env "$2"); shift 2 ;;
    --volume)
      need_value "$@"
      [[ "$2" =~ ^[^:]+:[^:]+$ ]] || die "--volume takes HOST_PATH:CONTAINER_PATH, not '$2'"
      extra_args+=(--volume "$2"); shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

case "$model" in
  tiny | small | large) variant="sam2.1-hiera-$model" ;;
  base+ | base-plus) variant=sam2.1-hiera-base-plus ;;
  *) die "--model must be tiny, small, base+ or large, not '$model'" ;;
esac

platform_args=(--platform "$platform")
case "$platform" in
  local)
    # Join CVAT's network so the function reaches cvat_redis_ondisk and CVAT reaches the function.
    deploy_args=(--platform-config "{\"attributes\": {\"network\": \"$network\"}}")
    ;;
  kube)
    [ -n "$registry" ] || die "--platform kube needs --registry (or NUCTL_REGISTRY): the cluster pulls the built image from there"
    platform_args+=(--namespace "$namespace")
    deploy_args=(--registry "$registry" --run-registry "${run_registry:-$registry}")
    if [ "$function_file" = function.yaml ]; then
      # One torch thread per worker and a CPU limit equal to the request (2 workers, 2 cores):
      # unbounded, one request spreads over every core of the node and reads as several hundred
      # percent of the request, so the autoscaler would go straight to maxReplicas. --env
      # OMP_NUM_THREADS=N overrides the thread count.
      deploy_args+=(--resource-limit cpu=2 --env OMP_NUM_THREADS=1)
    fi
    ;;
  *) die "--platform must be local or kube, not '$platform'" ;;
esac

command -v nuctl >/dev/null 2>&1 || die "nuctl is not on PATH. Install the nuctl release that matches \
your Nuclio dashboard's version (https://github.com/nuclio/nuclio/releases), e.g. as /usr/local/bin/nuctl."

# Nuclio copies the whole --path into the image, so deploy a clean copy of the function: no .git,
# no .venv (a local test environment of over 1 GB), no tests or benchmarks. Bash's * already
# skips dot entries.
stage="$(mktemp -d "${TMPDIR:-/tmp}/sam2-tracker-deploy.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
for entry in "$here"/*; do
  case "$(basename "$entry")" in
    tests | bench | __pycache__) ;;
    *) cp -R "$entry" "$stage/" ;;
  esac
done
# nuctl has no build arguments, so the variant goes into a copy of the yaml. One token names the
# weights downloaded at build time, SAM2_MODEL_ID at run time and the image tag, so replacing it
# everywhere keeps them in agreement.
sed "s/sam2\.1-hiera-tiny/$variant/g" "$here/$function_file" >"$stage/$function_file"

# As CVAT's scripts do. When re-run, the project already exists; if creating it really failed,
# nuctl deploy stops with "Project does not exist".
nuctl create project cvat "${platform_args[@]}" ||
  echo "note: could not create Nuclio project 'cvat'; it may already exist" >&2

echo "Deploying facebook/$variant from $function_file to the $platform platform..."
nuctl deploy --project-name cvat --path "$stage" --file "$stage/$function_file" \
  "${platform_args[@]}" "${deploy_args[@]}" \
  --env "CVAT_FUNCTIONS_REDIS_HOST=$redis_host" \
  --env "CVAT_FUNCTIONS_REDIS_PORT=$redis_port" \
  --env "CVAT_FUNCTIONS_REDIS_PASSWORD=$redis_password" \
  ${extra_args[@]+"${extra_args[@]}"}

nuctl get function "${platform_args[@]}"

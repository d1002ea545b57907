#!/usr/bin/env bash
# The CUDA images on a host that reaches PyPI but no container registry (the project's own machines):
#   images/local/build-cuda-images.sh [train-cuda|infer-cuda|all]     (default: all)
# Docker engine (images/local/docker-engine.sh, unless DOCKER_HOST names another daemon), the
# debootstrap base (images/local/build-base.sh), then images/build.sh on it, then the smoke test of
# each image (images/smoke-test.sh). Prints each build's wall time and the image's size.
# Environment: as images/build.sh (REGISTRY, DOCKER_BUILD_ARGS, ...); BASE_IMAGE defaults to the
# local base; SMOKE=0 skips the smoke test.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ -z "${DOCKER_HOST:-}" ]; then images/local/docker-engine.sh start >/dev/null; fi
export BASE_IMAGE=${BASE_IMAGE:-medcritical-base:bookworm-local}
if [ "$BASE_IMAGE" = medcritical-base:bookworm-local ]; then images/local/build-base.sh >/dev/null; fi
version=$(images/build.sh version)
case "${1:-all}" in
    train-cuda | infer-cuda) names=$1 ;;
    all) names="train-cuda infer-cuda" ;;
    *) echo "usage: $0 train-cuda|infer-cuda|all" >&2; exit 2 ;;
esac
for name in $names; do
    tag="${REGISTRY:-}medcritical-$name:$version"
    start=$(date +%s)
    images/build.sh "$name"
    echo "$tag: built in $(($(date +%s) - start)) s," \
        "$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')"
    if [ "${SMOKE:-1}" != 0 ]; then images/smoke-test.sh "$tag"; fi
done

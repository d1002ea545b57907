#!/usr/bin/env bash
# The CPU image for the local cluster, on a host that reaches PyPI but no container registry:
# Docker engine (images/local/docker-engine.sh), a debootstrap base (images/local/build-base.sh),
# then images/build.sh cpu on it with PyPI's torch (ALLOW_CUDA_TORCH=1, see images/cpu/Dockerfile).
# Docker's layer cache makes a second build of unchanged sources take seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
images/local/docker-engine.sh start >/dev/null
images/local/build-base.sh >/dev/null
TORCH_INDEX_URL="" BASE_IMAGE=medcritical-base:bookworm-local \
  DOCKER_BUILD_ARGS="--build-arg ALLOW_CUDA_TORCH=1 ${DOCKER_BUILD_ARGS:-}" \
  images/build.sh cpu

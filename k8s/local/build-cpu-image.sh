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
tag=medcritical-cpu:$(images/build.sh version)
previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
TORCH_INDEX_URL="" BASE_IMAGE=medcritical-base:bookworm-local \
  DOCKER_BUILD_ARGS="--build-arg ALLOW_CUDA_TORCH=1 ${DOCKER_BUILD_ARGS:-}" \
  images/build.sh cpu
# A rebuild leaves the image the tag named before untagged (6 GB). Two or three of them filled this
# disk: the kubelet's disk-pressure eviction then deleted the node's own images, the pause image first,
# and no pod could start ("failed to get sandbox image"). The layers the new image shares stay.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || echo "kept the previous $tag ($previous): still in use" >&2
fi

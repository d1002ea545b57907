#!/usr/bin/env bash
# Build the MedCritical images, tagged with the version in pyproject.toml:
#   images/build.sh cpu|train-cuda|infer-cuda|all
#   images/build.sh context     only assemble the build context (prints its path)
#   images/build.sh version     print the version the tags use
# -> ${REGISTRY}medcritical-<name>:<version>, e.g. medcritical-cpu:0.1.0
#
# Environment:
#   REGISTRY         prefix for the tags, e.g. registry.example.com/ml/ (empty: local names)
#   BASE_IMAGE       override the Dockerfile's base image (e.g. medcritical-base:bookworm-local)
#   WHEELS_DIR       a folder of wheels offered to pip first (e.g. a local torch CPU wheel)
#   TORCH_INDEX_URL  where the CPU image finds torch's CPU build ("" = wheels/PyPI only)
#   BUILD_CA_BUNDLE  a CA bundle pip uses during the build (default: $PIP_CERT), for TLS proxies;
#                    it stays in the CPU image's build stages; the CUDA images build their
#                    virtualenv in their own layers, so it is in a lower layer of theirs
#                    (images/README.md, "What a build needs")
#   DOCKER_BUILD_ARGS  anything else for `docker build` (e.g. --build-arg TORCH_CUDA_ARCH_LIST=9.0)
#   PUSH=1           push after building
#   PYTHON           a python >= 3.11 to read pyproject.toml (default python3)
#   IMAGE_CONTEXT    where to assemble the build context (default build/image-context)
# The build context is assembled under build/image-context: only what the images need, so the
# checkout's virtualenv and runs never travel to the daemon.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$version" ] || { echo "no version in pyproject.toml" >&2; exit 1; }
if [ "${1:-}" = version ]; then echo "$version"; exit 0; fi

context=${IMAGE_CONTEXT:-build/image-context}
rm -rf "$context"
mkdir -p "$context/project" "$context/images/wheels" "$context/images/certs"
# project/: what pip needs to build the package (the folders pyproject.toml maps packages to) and
# the recipes; images/: build inputs that never reach the final image.
package_roots=$("${PYTHON:-python3}" images/project_layout.py roots pyproject.toml)
# shellcheck disable=SC2086
tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - \
    pyproject.toml recipes $package_roots $(ls README* LICENSE* 2>/dev/null) |
    tar -C "$context/project" -xf -
if [ ! -f "$context/project/README.md" ]; then
    echo "MedCritical" >"$context/project/README.md"  # pyproject names a readme; keep the build working
fi
cp images/project_layout.py "$context/images/"
if [ -n "${WHEELS_DIR:-}" ]; then
    cp "$WHEELS_DIR"/*.whl "$context/images/wheels/"
fi

ca_bundle=${BUILD_CA_BUNDLE:-${PIP_CERT:-}}
if [ -n "$ca_bundle" ]; then
    cp "$ca_bundle" "$context/images/certs/ca-bundle.crt"
fi

build() {
    local name=$1
    local tag="${REGISTRY:-}medcritical-$name:$version"
    local args=(--network host --build-arg "VERSION=$version" -f "images/$name/Dockerfile")
    [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    if [ "$name" = cpu ] && [ -n "${TORCH_INDEX_URL+set}" ]; then
        args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    fi
    # shellcheck disable=SC2206
    args+=(${DOCKER_BUILD_ARGS:-})
    echo "+ docker build ${args[*]} -t $tag $context"
    docker build "${args[@]}" -t "$tag" "$context"
    # A rebuild leaves untagged what earlier builds made: the image the tag named before and their wheel
    # stages (for the CPU image, with 6 GB of dependencies under each). A few of them once filled the disk
    # under the local cluster. This build's wheel stage is tagged (from the cache: a second) so that it
    # stays as the next build's cache, then the untagged ones go; layers still in use stay.
    docker build -q "${args[@]}" --target wheel -t "medcritical-$name-wheel:$version" "$context" >/dev/null
    docker image prune -f --filter "label=org.opencontainers.image.title=medcritical-$name" >/dev/null
    docker image prune -f --filter "label=medcritical.build-stage=wheel" >/dev/null
    if [ "${PUSH:-}" = 1 ]; then docker push "$tag"; fi
    echo "built $tag"
}

case "${1:-all}" in
    cpu | train-cuda | infer-cuda) build "$1" ;;
    all) for name in cpu train-cuda infer-cuda; do build "$name"; done ;;
    context) echo "$context" ;;
    *) echo "usage: $0 cpu|train-cuda|infer-cuda|all|context|version" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Build a Debian 12 base image locally, for hosts that cannot pull from a registry:
# debootstrap a minimal root filesystem with python3 (3.11) and its venv module, then
# `docker import` it. Use it as BASE_IMAGE for the CPU image:
#
#   images/local/build-base.sh                       # -> medcritical-base:bookworm-local
#   BASE_IMAGE=medcritical-base:bookworm-local make image-cpu
#
# Needs root, debootstrap and a Debian mirror (MIRROR, default deb.debian.org).
set -euo pipefail

TAG=${1:-medcritical-base:bookworm-local}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates,passwd

if docker image inspect "$TAG" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
    echo "$TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/medcritical-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"
# Smaller and reproducible-ish: no package lists, caches or logs in the image.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* "$rootfs"/tmp/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG"
docker run --rm --network none "$TAG" python3 -c "import sys, venv; print('base ok:', sys.version.split()[0])"

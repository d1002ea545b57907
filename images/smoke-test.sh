#!/usr/bin/env bash
# The smoke test of a built MedCritical image, no GPU needed:
#   images/smoke-test.sh medcritical-train-cuda:0.1.0      (or medcritical-infer-cuda:…, medcritical-cpu:…)
# Runs the image as the Kubernetes Jobs do (UID 10001, read-only root filesystem, /tmp and the home
# folder writable, no network): the entrypoint's `--help`, then images/smoke_check.py inside it
# (imports and versions against the project's pins, torch.version.cuda, the user and folders, and
# for the training image ds_report's prebuilt ops and the absence of nvcc). The check's last line,
# SUMMARY {...}, is the JSON record of what it found.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
image=${1:?usage: $0 IMAGE}
name=${image##*/}
name=${name%%:*}
kind=${name#medcritical-}
expected=$("${PYTHON:-python3}" "$root/images/smoke_check.py" --expected "$kind")
job=(docker run --rm --network none --read-only
     --tmpfs /tmp:rw,mode=1777
     --tmpfs /home/medcritical:rw,uid=10001,gid=10001,mode=0755)
help=$("${job[@]}" "$image" --help)
echo "entrypoint --help: ${help%%$'\n'*}"
"${job[@]}" -i --entrypoint python "$image" - "$kind" "$expected" <"$root/images/smoke_check.py"

#!/usr/bin/env bash
# The prepared GPU check: the training and generation benchmarks on 7B-shaped random models, in at most
# 8 minutes of one GPU with no network, writing their figures where `python -m benchmarks.report` reads them.
#
#   benchmarks/gpu_check.sh prepare   # here, with PyPI: the wheels a GPU machine may lack -> benchmarks/wheelhouse*/
#   benchmarks/gpu_check.sh install   # on the GPU machine: install what is missing from the carried wheelhouses
#   benchmarks/gpu_check.sh run       # on the GPU machine: install, then measure and write the figures
#   benchmarks/gpu_check.sh smoke     # on CPU: the same steps on the tiny model (tests/test_gpu_check.py)
#
# Installs only the distributions that are missing, from the wheelhouses (no index), into
# benchmarks/.gpu-check/site (git-ignored, so kept on a warm machine between calls), put first on PYTHONPATH:
# the machine's own packages are left as they are. The wheels are 20 MB plus pyarrow's 53 MB, over the 64 MiB
# a call may carry, so pyarrow has a wheelhouse of its own. With the device tool, where the machine lacks pyarrow:
#   1. run "benchmarks/gpu_check.sh install" carrying ["benchmarks/wheelhouse-pyarrow"]
#   2. run "benchmarks/gpu_check.sh run" carrying ["benchmarks/wheelhouse"] (timeout_s 480)
# (where it has pyarrow, step 2 alone). Results go to $RESULTS_DIR (default benchmarks/results) and, when $OUT
# is set (the device tool), to $OUT/results too. Then: python -m benchmarks.report; commit the JSON and BENCHMARKS.md.
#
# vLLM is not measured: its CUDA wheel (hundreds of MB) cannot be carried and the GPU machine has no network;
# benchmarks/engines_cpu.py compares the engines on CPU instead.
set -euo pipefail

MODE=${1:-run}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
WHEELHOUSES="$REPO/benchmarks/wheelhouse $REPO/benchmarks/wheelhouse-pyarrow"
SITE=${SITE:-$REPO/benchmarks/.gpu-check/site}
RESULTS_DIR=${RESULTS_DIR:-$REPO/benchmarks/results}
WORK=${WORK_DIR:-$REPO/benchmarks/.gpu-check/work}
# The training stack the GPU machine lacks (it has torch, transformers, peft, accelerate), pinned as in
# pyproject.toml, with what those bring that a torch/transformers image may not have (the versions the
# project's test venv resolved, Nov 2026).
WHEELS="trl==1.16.0 datasets==5.2.0 deepspeed==0.19.8 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
        fsspec==2026.9.0 pandas==3.1.1 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 psutil==7.2.2"
HEAVY="pyarrow==26.0.1"  # 53 MB: a wheelhouse of its own (see above)
# Seconds per part, so that the whole check stays under 8 minutes; a rerun resumes from $WORK.
TRAIN_BUDGET=${TRAIN_BUDGET:-300}
GENERATE_BUDGET=${GENERATE_BUDGET:-120}

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

fetch() {
  local house=$1 spec=$2
  mkdir -p "$house"
  if [[ $spec == deepspeed* ]]; then  # an sdist only: built here into a pure-Python wheel
    "$PYTHON" -m pip wheel -q --no-deps -w "$house" "$spec"
  else
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$house" "$spec"
  fi
}

prepare() {
  for spec in $WHEELS; do fetch "$REPO/benchmarks/wheelhouse" "$spec"; done
  for spec in $HEAVY; do fetch "$REPO/benchmarks/wheelhouse-pyarrow" "$spec"; done
  du -sh "$REPO"/benchmarks/wheelhouse*
}

install_missing() {
  mkdir -p "$SITE"
  export PYTHONPATH="$SITE:$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  local missing
  # shellcheck disable=SC2086
  missing=$("$PYTHON" - $WHEELHOUSES <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for house in map(Path, sys.argv[1:]):
    for wheel in sorted(house.glob("*.whl")) if house.is_dir() else []:
        try:
            version(wheel.name.split("-")[0])  # installed here, or by an earlier call into $SITE
        except PackageNotFoundError:
            print(wheel)
PY
)
  if [[ -n $missing ]]; then
    log "installing from the wheelhouses: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" $missing
  else
    log "nothing to install from the wheelhouses"
  fi
  [[ ${1:-} == check ]] || return 0
  "$PYTHON" -c "import trl, deepspeed, datasets, peft, medcritical; print('imports ok: trl', trl.__version__, 'deepspeed', deepspeed.__version__)"
}

measure() {
  local tiny=$1 suffix=""
  mkdir -p "$RESULTS_DIR" "$WORK"
  local train_args=(--work-dir "$WORK/training")
  local generate_args=(--backends transformers --work-dir "$WORK/generation")
  if [[ $tiny == 1 ]]; then
    # Two cases keep the CPU smoke run short (each case is a process of its own); the GPU run does all four.
    # shellcheck disable=SC2206
    train_args+=(--tiny --cases ${SMOKE_CASES:-sft-lora dpo-lora-precomputed})
    generate_args+=(--tiny)
    suffix="-tiny"
  else
    # 7B-shaped: few steps and a smaller evaluation sample, so both parts fit their budgets.
    train_args+=(--cases sft-lora sft-full-zero3 dpo-lora dpo-lora-precomputed --steps 8 --warmup 3)
    generate_args+=(--rollout-questions 64 --eval-measured 64 --max-new-tokens 256 --decode-tokens 128)
  fi
  log "training benchmarks (budget ${TRAIN_BUDGET} s)"
  timeout "$TRAIN_BUDGET" "$PYTHON" -m benchmarks.training_gpu "${train_args[@]}" \
    --output "$RESULTS_DIR/training_gpu$suffix.json" || log "training part ended with code $? (a rerun resumes)"
  log "generation benchmark, transformers only (budget ${GENERATE_BUDGET} s)"
  timeout "$GENERATE_BUDGET" "$PYTHON" -m benchmarks.generation_gpu "${generate_args[@]}" \
    --output "$RESULTS_DIR/generation_gpu$suffix.json" || log "generation part ended with code $? (a rerun resumes)"
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT/results"
    cp "$RESULTS_DIR"/*_gpu"$suffix".json "$OUT/results/" 2>/dev/null || true
  fi
  log "figures in $RESULTS_DIR; render with: python -m benchmarks.report"
}

case $MODE in
  prepare) prepare ;;
  install) install_missing ;;
  run)
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || { echo "gpu_check run: no CUDA GPU visible; use 'smoke' on CPU" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    install_missing check
    measure 0
    ;;
  smoke)
    install_missing check
    measure 1
    ;;
  *) echo "usage: benchmarks/gpu_check.sh prepare|install|run|smoke" >&2; exit 2 ;;
esac

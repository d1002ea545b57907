"""The smoke test of a MedCritical image, run inside it by images/smoke-test.sh (no GPU needed):

    python3 images/smoke_check.py --expected KIND      (on the host: the pins, as JSON)
    docker run ... --entrypoint python IMAGE - KIND EXPECTED_JSON < images/smoke_check.py

KIND is cpu, train-cuda or infer-cuda; EXPECTED_JSON maps distribution names to the versions the
project pins (plus "cuda": torch.version.cuda). It imports the libraries a step of that image uses,
compares their versions, checks the user, the read-only root filesystem and the writable work
folder (/tmp) and home as the Kubernetes Jobs mount them, and for the training image that
DeepSpeed's ops are prebuilt (ds_report) and no CUDA compiler is left. It prints one line per
check and a JSON summary last; it exits 1 on the first failed check's list.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def expected_pins(kind: str) -> dict[str, object]:
    """What the image must hold: the Dockerfile's torch, DeepSpeed, vLLM and CUDA versions and
    pyproject.toml's exact pins of the training libraries (read on the host, from the checkout)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    text = re.sub(r"\\\n", " ", (root / "images" / kind / "Dockerfile").read_text(encoding="utf-8"))
    args = {m[1]: m[2].strip('"') for m in re.finditer(r'^ARG (\w+)=("[^"]*"|\S+)', text, flags=re.MULTILINE)}
    pins: dict[str, object] = {}
    for dependency in tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^,;\s]+)", dependency.split("#")[0].strip())
        if found:
            pins[found[1].lower()] = found[2]
    expected: dict[str, object] = {name: pins[name] for name in ("transformers", "trl", "peft", "accelerate")}
    expected["torch"] = args["TORCH_VERSION"]
    if "CUDA_VERSION" in args:
        expected["cuda"] = args["CUDA_VERSION"]
    if "DEEPSPEED_VERSION" in args:
        expected["deepspeed"] = args["DEEPSPEED_VERSION"]
        flags = dict(flag.split("=") for flag in args["DS_BUILD_OPS_FLAGS"].split())
        ops = {"DS_BUILD_CPU_ADAM": "cpu_adam", "DS_BUILD_FUSED_ADAM": "fused_adam"}
        expected["deepspeed_ops"] = [op for flag, op in ops.items() if flags.get(flag) == "1"]
    if "VLLM_VERSION" in args:
        expected["vllm"] = args["VLLM_VERSION"]
    return expected


if sys.argv[1] == "--expected":
    print(json.dumps(expected_pins(sys.argv[2]), sort_keys=True))
    sys.exit(0)
kind, expected = sys.argv[1], json.loads(sys.argv[2])
failures: list[str] = []
summary: dict[str, object] = {"kind": kind}


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


# The libraries a step of this image imports, and their versions against the project's pins.
MODULES = {"torch": "torch", "transformers": "transformers", "trl": "trl", "peft": "peft", "accelerate": "accelerate"}
MODULES.update({"deepspeed": "deepspeed"} if kind == "train-cuda" else {})
MODULES.update({"vllm": "vllm"} if kind == "infer-cuda" else {})
versions = {}
for dist, module in MODULES.items():
    try:
        importlib.import_module(module)
        versions[dist] = importlib.metadata.version(dist)
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        check(False, f"import {module}: {type(error).__name__}: {error}")
for dist, version in versions.items():
    want = expected.get(dist)
    check(want is None or version == want, f"{dist} {version}" + (f" (pinned {want})" if want else ""))
summary["versions"] = versions

import torch  # noqa: E402 - imported (and checked) above

summary["torch"] = torch.__version__
summary["torch_cuda"] = torch.version.cuda
if "cuda" in expected:
    check(
        torch.version.cuda == expected["cuda"], f"torch.version.cuda {torch.version.cuda} (expected {expected['cuda']})"
    )
summary["cuda_available"] = torch.cuda.is_available()

# As the Jobs run it: numeric non-root user, read-only root, /tmp (the work folder) and home writable.
check(os.getuid() == 10001 and os.getgid() == 10001, f"uid {os.getuid()} gid {os.getgid()}")
check(Path.cwd() == Path("/opt/medcritical"), f"working directory {Path.cwd()}")
check((Path.cwd() / "recipes" / "demo.yaml").is_file(), "recipes/demo.yaml in the working directory")
for folder in ("/", "/opt/medcritical", "/opt/venv"):
    try:
        tempfile.NamedTemporaryFile(dir=folder).close()
        check(False, f"{folder} is writable (the Jobs run with a read-only root filesystem)")
    except OSError:
        check(True, f"{folder} read-only")
for folder in ("/tmp", os.environ.get("HOME", "/home/medcritical"), os.environ.get("HF_HOME", "")):
    if not folder:
        continue
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder) as handle:
            handle.write(b"x" * 1024 * 1024)
        check(True, f"{folder} writable")
    except OSError as error:
        check(False, f"{folder} not writable: {error}")
cli = subprocess.run(["medcritical", "--help"], capture_output=True, text=True)
check(cli.returncode == 0 and "evaluate" in cli.stdout, "medcritical --help")

site = Path(sysconfig.get_paths()["purelib"])
compiler = [str(p.relative_to(site)) for p in (site / "nvidia" / "cu13").glob("bin/nvcc")]
summary["nvcc"] = compiler or None
if kind == "train-cuda":
    check(not compiler and not shutil.which("nvcc"), "no CUDA compiler in the image (build stage only)")
    from deepspeed.git_version_info import installed_ops

    built = sorted(op for op, installed in installed_ops.items() if installed)
    summary["deepspeed_installed_ops"] = built
    report = subprocess.run(["ds_report"], capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cuda"})
    plain = re.sub(r"\x1b\[[0-9;]*m", "", report.stdout)
    rows = dict(re.findall(r"^(\w+) \.+ \[(YES|NO)\]", plain, flags=re.MULTILINE))
    summary["ds_report_installed"] = sorted(op for op, installed in rows.items() if installed == "YES")
    print(plain, flush=True)
    for op in expected.get("deepspeed_ops", ["cpu_adam", "fused_adam"]):
        check(rows.get(op) == "YES", f"ds_report: {op} installed")
if kind == "infer-cuda":
    import vllm

    summary["vllm"] = vllm.__version__

print("SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
if failures:
    print(f"{len(failures)} failed: {failures}", file=sys.stderr)
    sys.exit(1)

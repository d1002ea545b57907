"""The container images: static checks of the Dockerfiles (always), and one real build and run of
the CPU image (opt-in: marker `docker`, MEDCRITICAL_DOCKER_TESTS=1; five to ten minutes the first time,
less than a minute with Docker's layer cache).

The real run installs Debian's docker.io engine and debootstrap when missing, builds a Debian base
image locally (no registry is needed), builds the CPU image on it with images/build.sh, then runs
`medcritical --help` and an evaluation of the offline tiny model inside it, without network and on
a read-only root filesystem, as a Kubernetes Job would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
_spec = importlib.util.spec_from_file_location("project_layout", IMAGES / "project_layout.py")
project_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(project_layout)
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
LOCAL_BASE = "medcritical-base:bookworm-local"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's build stages, each as its text from one FROM to the next (lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    return re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]


def _args(dockerfile: Path) -> dict[str, str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+)", text, flags=re.MULTILINE)}


def _pin(name: str) -> Requirement:
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_stage_runs_the_cli_as_non_root(dockerfile):
    final = _stages(dockerfile)[-1]
    assert final.startswith("FROM ${BASE_IMAGE}"), f"{_rel(dockerfile)}: the base image is the build arg BASE_IMAGE"
    user = re.findall(r"^USER (\S+)", final, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", (
        f"{_rel(dockerfile)}: the image ends with a numeric non-root USER (Kubernetes' runAsNonRoot checks it)"
    )
    assert 'ENTRYPOINT ["medcritical"]' in final
    assert "COPY project/recipes/ /opt/medcritical/recipes/" in final and "WORKDIR /opt/medcritical" in final


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pinned_and_free_of_secrets(dockerfile):
    args = _args(dockerfile)
    for name, value in args.items():
        if name.endswith("_IMAGE"):
            tag = value.rsplit("/", 1)[-1]
            assert ":" in tag and not tag.endswith(":latest"), f"{_rel(dockerfile)}: {name}={value} is not pinned"
    assert Version(args["TORCH_VERSION"]) in _pin("torch").specifier, "torch in the image outside pyproject's range"
    if "DEEPSPEED_VERSION" in args:
        assert str(_pin("deepspeed").specifier) == f"=={args['DEEPSPEED_VERSION']}"
    text = dockerfile.read_text(encoding="utf-8")
    assert not re.search(
        r"^(ENV|ARG)\s.*(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY)", text, flags=re.MULTILINE | re.I
    ), f"{_rel(dockerfile)}: credentials come from Kubernetes Secrets at run time, never from the image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_torch_is_pinned_in_the_same_install_as_the_project(dockerfile):
    # Without the pin in the same command, pip resolves the project's torch range to the newest
    # (CUDA) build and replaces the one installed before.
    installs = [line for line in _stages(dockerfile)[0].splitlines() if "pip install" in line and "/stub" in line]
    assert installs and '"torch==${TORCH_VERSION}"' in installs[0], f"{_rel(dockerfile)}: {installs}"


def test_cpu_image_takes_torch_cpu_build():
    args = _args(IMAGES / "cpu" / "Dockerfile")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_inference_image_vllm_agrees_with_the_project():
    vllm = _args(IMAGES / "infer-cuda" / "Dockerfile")["VLLM_VERSION"]
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        for dependency in extra:
            requirement = Requirement(dependency)
            if requirement.name == "vllm" and requirement.specifier:
                assert Version(vllm) in requirement.specifier, f"vllm=={vllm} vs pyproject {requirement}"


def test_build_context_holds_what_the_dockerfiles_copy(tmp_path):
    context = tmp_path / "context"
    env = {k: v for k, v in os.environ.items() if k not in ("WHEELS_DIR", "BUILD_CA_BUNDLE", "PIP_CERT")}
    subprocess.run(
        [str(IMAGES / "build.sh"), "context"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**env, "IMAGE_CONTEXT": str(context), "PYTHON": sys.executable},
        timeout=120,
    )
    for dockerfile in DOCKERFILES:
        text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
        for sources in re.findall(r"^COPY (?!--from)(.*) \S+$", text, flags=re.MULTILINE):
            for source in sources.split():
                assert (context / source).exists(), f"{_rel(dockerfile)} copies {source}, not in the build context"
    # Every package pyproject.toml maps is in the context (a data package, such as the recipes, has no
    # __init__.py in the checkout either); no virtualenv or runs travel with it.
    for package, folder in project_layout.package_dirs(PYPROJECT).items():
        assert (context / "project" / folder).is_dir(), f"{package} ({folder}) missing"
        init = (context / "project" / folder / "__init__.py").is_file()
        assert init == (ROOT / folder / "__init__.py").is_file(), f"{package} ({folder}): __init__.py"
    assert not list(context.rglob("__pycache__")) and not (context / "project" / ".venv").exists()


def test_stub_project_has_every_package(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    project_layout.stub(tmp_path / "pyproject.toml")
    for folder in project_layout.package_dirs(PYPROJECT).values():
        assert (tmp_path / folder / "__init__.py").is_file()


def test_image_tags_use_the_project_version():
    result = subprocess.run([str(IMAGES / "build.sh"), "version"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == PYPROJECT["project"]["version"]


# ---- opt-in: build and run the CPU image for real ----

docker_enabled = pytest.mark.skipif(
    os.environ.get("MEDCRITICAL_DOCKER_TESTS") != "1",
    reason="builds a Docker image (minutes): set MEDCRITICAL_DOCKER_TESTS=1 or run `make docker-test`",
)


@pytest.fixture(scope="module")
def docker_engine():
    """A running Docker engine; one started here is stopped afterwards (by its PID file)."""
    result = subprocess.run(
        [str(IMAGES / "local" / "docker-engine.sh"), "start"], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        pytest.fail(f"no Docker engine:\n{result.stdout}\n{result.stderr}")
    yield
    if result.stdout.startswith("started"):
        subprocess.run([str(IMAGES / "local" / "docker-engine.sh"), "stop"], capture_output=True, timeout=120)


def _wheels_dir() -> str | None:
    """A local folder with torch's CPU wheel (MEDCRITICAL_WHEELS_DIR, or pip's find-links here)."""
    for folder in (os.environ.get("MEDCRITICAL_WHEELS_DIR"), os.environ.get("PIP_FIND_LINKS"), "/opt/wheels"):
        if folder and list(Path(folder).glob("torch-*+cpu-*.whl")):
            return folder
    return None


@pytest.fixture(scope="module")
def cpu_image(docker_engine):
    version = PYPROJECT["project"]["version"]
    subprocess.run([str(IMAGES / "local" / "build-base.sh"), LOCAL_BASE], check=True, timeout=1800)
    env = {**os.environ, "BASE_IMAGE": LOCAL_BASE, "PYTHON": sys.executable}
    wheels = _wheels_dir()
    if wheels:  # offline: torch's CPU build from the local wheel, no PyTorch index
        env.update(WHEELS_DIR=wheels, TORCH_INDEX_URL="")
    result = subprocess.run(
        [str(IMAGES / "build.sh"), "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    return f"medcritical-cpu:{version}"


def _run(image: str, *command: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    # As a Job runs it: no network, read-only root filesystem, writable /tmp and home.
    docker = [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,mode=1777",
        "--tmpfs",
        "/home/medcritical:rw,uid=10001,gid=10001,mode=0755",
    ]
    if entrypoint:
        docker += ["--entrypoint", entrypoint]
    return subprocess.run([*docker, image, *command], capture_output=True, text=True, timeout=1800)


@pytest.mark.docker
@docker_enabled
def test_cpu_image_runs_the_cli(cpu_image):
    result = _run(cpu_image, "--help")
    assert result.returncode == 0, result.stderr
    assert "evaluate" in result.stdout and "prepare-data" in result.stdout
    user = _run(cpu_image, "-u", entrypoint="id")
    assert user.stdout.strip() == "10001"


@pytest.mark.docker
@docker_enabled
def test_cpu_image_evaluates_the_tiny_model(cpu_image):
    script = (
        "set -e; "
        "medcritical build-tiny-model --recipe recipes/demo.yaml --output /tmp/tiny; "
        "medcritical evaluate --recipe recipes/demo.yaml --model /tmp/tiny --output /tmp/eval "
        "--set run.output_dir=/tmp/run --set evaluate.limit=8; "
        "echo ---report---; cat /tmp/eval/report.json"
    )
    result = _run(cpu_image, "-c", script, entrypoint="sh")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.split("---report---", 1)[1])
    assert 0.0 <= report["accuracy"] <= 1.0

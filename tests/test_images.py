"""The container images, in three tiers:

- static checks of the Dockerfiles, the tags and the smoke test's pins (always; seconds);
- the image tier (marker `docker`, MEDCRITICAL_DOCKER_TESTS=1, what CI runs where a Docker engine can
  run): the CPU image built and run for real, and each CUDA image's pins resolved together by pip
  against PyPI (a dry run: nothing installed, no image built). The CPU build is the local cluster's
  (k8s/local/build-cpu-image.sh) unless a torch CPU wheel is at hand, so both share Docker's layer
  cache: 14 min 46 s cold on the project's 2-core machine (the CPU image 9 min 39 s of it),
  4 min 49 s warm (the two pip resolutions 4 min of it; the cached CPU build 1 s);
- the CUDA images built and smoke-tested (MEDCRITICAL_CUDA_IMAGE_TESTS=1 as well; 15 to 16 minutes
  each cold here and 15 to 20 GB free while each builds; the smoke tests 18 and 28 s; a warm run,
  from Docker's layer cache, was not timed: images/README.md).

A real run installs Debian's docker.io engine and debootstrap when missing, builds a Debian base
image locally (no registry is needed), builds on it with images/build.sh, then runs the image without
network, on a read-only root filesystem, with /tmp and the home folder writable, as a Kubernetes
Job would.
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
    return {m[1]: m[2].strip('"') for m in re.finditer(r'^ARG (\w+)=("[^"]*"|\S+)', text, flags=re.MULTILINE)}


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
    lines = [line for stage in _stages(dockerfile) for line in stage.splitlines()]
    installs = [line for line in lines if "pip install" in line and "/stub" in line]
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


CUDA_KINDS = ["train-cuda", "infer-cuda"]


def _dockerfile(kind: str) -> Path:
    return IMAGES / kind / "Dockerfile"


@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_cuda_images_need_no_cuda_base_image(kind):
    # torch's PyPI wheels carry the CUDA runtime: every stage starts from BASE_IMAGE (a plain
    # Debian/Ubuntu with python, or the debootstrap base) or from an earlier stage, never from a
    # CUDA image that no machine of the project can pull and that would ship CUDA a second time.
    dockerfile = _dockerfile(kind)
    args = _args(dockerfile)
    assert "nvidia/cuda" not in args["BASE_IMAGE"], f"{_rel(dockerfile)}: default base {args['BASE_IMAGE']}"
    assert [name for name in args if name.endswith("_IMAGE")] == ["BASE_IMAGE"]
    earlier: list[str] = []
    for stage in _stages(dockerfile):
        words = stage.split()
        assert words[1] == "${BASE_IMAGE}" or words[1] in earlier, f"{_rel(dockerfile)}: FROM {words[1]}"
        if len(words) > 3 and words[2] == "AS":
            earlier.append(words[3])
    # The virtualenv is built in the image's own chain of layers (a copy from a build stage would
    # need it twice on the build host, and three times while the classic builder commits the copy:
    # more than the project's machines have free); only the project's wheel comes from a stage.
    copies = re.findall(r"^COPY --from=(\S+) (\S+)", _stages(dockerfile)[-1], flags=re.MULTILINE)
    assert copies == [("wheel", "/dist/")], copies
    assert "python3 -m venv /opt/venv" in _stages(dockerfile)[-1]


def test_cuda_images_agree_on_torch_and_its_cuda():
    train, infer = (_args(_dockerfile(kind)) for kind in CUDA_KINDS)
    assert train["TORCH_VERSION"] == infer["TORCH_VERSION"]
    assert train["CUDA_VERSION"] == infer["CUDA_VERSION"] == "13.0"  # torch 2.13.0's PyPI build: +cu130
    for kind in CUDA_KINDS:  # the build fails when torch is built for another CUDA
        assert "assert torch.version.cuda == '${CUDA_VERSION}'" in _stages(_dockerfile(kind))[-1]


def test_training_image_compiler_is_torchs_cuda_and_leaves_in_its_own_layer():
    dockerfile = _dockerfile("train-cuda")
    args = _args(dockerfile)
    wheels = [Requirement(wheel) for wheel in args["CUDA_COMPILER_WHEELS"].split()]
    assert {wheel.name for wheel in wheels} == {
        "nvidia-cuda-nvcc",
        "nvidia-nvvm",
        "nvidia-cuda-crt",
        "nvidia-cuda-cccl",
    }
    for wheel in wheels:  # DeepSpeed refuses an nvcc of another minor version than torch's CUDA
        (spec,) = wheel.specifier
        assert spec.operator == "==" and spec.version.startswith(args["CUDA_VERSION"] + "."), wheel
    # Installed, used and uninstalled in one RUN: an uninstall in a later layer would leave the
    # compiler in the image's history (and in the venv the image copies, were the order to change).
    runs = [
        run
        for run in re.split(r"^RUN ", _stages(dockerfile)[-1], flags=re.MULTILINE)
        if "${CUDA_COMPILER_WHEELS}" in run
    ]
    assert len(runs) == 1, runs
    run = runs[0]
    install, build, uninstall = (run.index(s) for s in ("${CUDA_COMPILER_WHEELS}", "deepspeed==", "pip uninstall"))
    assert install < build < uninstall and "DS_ACCELERATOR=cuda" in run and "TORCH_CUDA_ARCH_LIST" in run
    assert args["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0"  # A100, H100/H200, B200: the GPUs docs/kubernetes.md names


def test_smoke_test_expects_the_project_pins():
    expected = {
        kind: json.loads(
            subprocess.run(
                [sys.executable, str(IMAGES / "smoke_check.py"), "--expected", kind],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for kind in CUDA_KINDS
    }
    for kind, pins in expected.items():
        for name in ("transformers", "trl", "peft", "accelerate"):
            assert f"=={pins[name]}" == str(_pin(name).specifier), (kind, name)
        assert Version(pins["torch"]) in _pin("torch").specifier and pins["cuda"] == "13.0"
    assert f"=={expected['train-cuda']['deepspeed']}" == str(_pin("deepspeed").specifier)
    assert expected["train-cuda"]["deepspeed_ops"] == ["cpu_adam", "fused_adam"]
    assert expected["infer-cuda"]["vllm"] == _args(_dockerfile("infer-cuda"))["VLLM_VERSION"]


def test_manifests_and_compiled_pipeline_name_the_images_as_build_sh_tags_them(tmp_path):
    from medcritical.orchestration.recipe import load_recipe
    from medcritical.platform.pipeline_runner import compile_pipeline

    version = PYPROJECT["project"]["version"]
    build_sh = (IMAGES / "build.sh").read_text(encoding="utf-8")
    names = re.search(r"^    cpu \| train-cuda \| infer-cuda\) build", build_sh, flags=re.MULTILINE)
    assert names, "images/build.sh builds cpu, train-cuda and infer-cuda"
    assert 'local tag="${REGISTRY:-}medcritical-$name:$version"' in build_sh
    tags = {f"medcritical-{name}:{version}" for name in ("cpu", "train-cuda", "infer-cuda")}
    # kustomize: the image names the Jobs use, with the version as their tag.
    component = (ROOT / "k8s" / "components" / "images" / "kustomization.yaml").read_text(encoding="utf-8")
    listed = set(re.findall(r"- name: (\S+)\n\s+newTag: \"([^\"]+)\"", component))
    assert {f"{name}:{tag}" for name, tag in listed} == tags
    # The compiled pipeline, as checked in (no registry) and with --registry: every image it names
    # is one of the tags, behind the registry prefix, in the executors and in the TrainJob's image
    # parameter alike.
    checked_in = (ROOT / "pipelines" / "medcritical.yaml").read_text(encoding="utf-8")
    registry = "registry.example.com:5000/ml/"
    recompiled = compile_pipeline(
        load_recipe(ROOT / "recipes" / "paper-7b-lora.yaml"), tmp_path / "p.yaml", registry=registry
    )
    for prefix, text in (("", checked_in), (registry, recompiled.read_text(encoding="utf-8"))):
        named = set(re.findall(r"([\w.:/-]*medcritical-(?:cpu|train-cuda|infer-cuda)[\w.:-]*)", text))
        assert named == {prefix + tag for tag in tags}, named


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
    """The CPU image: from a local torch CPU wheel when there is one; otherwise the local cluster's
    own build (k8s/local/build-cpu-image.sh: PyPI's CUDA torch, which runs on the CPU the same), so
    this test and the cluster tier build one image with one layer cache."""
    version = PYPROJECT["project"]["version"]
    env = {**os.environ, "BASE_IMAGE": LOCAL_BASE, "PYTHON": sys.executable}
    wheels = _wheels_dir()
    if wheels:  # offline: torch's CPU build from the local wheel, no PyTorch index
        subprocess.run([str(IMAGES / "local" / "build-base.sh"), LOCAL_BASE], check=True, timeout=1800)
        env.update(WHEELS_DIR=wheels, TORCH_INDEX_URL="")
        command = [str(IMAGES / "build.sh"), "cpu"]
    else:
        command = [str(ROOT / "k8s" / "local" / "build-cpu-image.sh")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    return f"medcritical-cpu:{version}"


def _smoke(image: str) -> dict:
    """images/smoke-test.sh on a built image; its SUMMARY line."""
    result = subprocess.run(
        [str(IMAGES / "smoke-test.sh"), image],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.rsplit("SUMMARY ", 1)[1])


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


@pytest.mark.docker
@docker_enabled
def test_cpu_image_smoke_test(cpu_image):
    summary = _smoke(cpu_image)
    assert summary["versions"]["transformers"] == str(_pin("transformers").specifier).lstrip("=")


# ---- the CUDA images: their pins resolved by pip (image tier), built and run (opt-in) ----


def _cuda_install_sets(kind: str, stub: Path) -> list[list[str]]:
    """The requirement sets of the CUDA image's deps stage, in its order of installs."""
    args = _args(_dockerfile(kind))
    torch = f"torch=={args['TORCH_VERSION']}"
    if kind == "train-cuda":
        deepspeed = f"deepspeed=={args['DEEPSPEED_VERSION']}"
        return [[torch, *args["CUDA_COMPILER_WHEELS"].split()], [torch, deepspeed, str(stub)]]
    return [[torch, f"vllm=={args['VLLM_VERSION']}", str(stub)]]


@pytest.mark.docker
@docker_enabled
@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_cuda_image_pins_resolve_together(kind, tmp_path):
    """pip resolves each install of the CUDA image's deps stage against PyPI, as the build would,
    without installing anything (--dry-run; DeepSpeed's metadata comes from its sdist): the pins agree with each other, torch's CUDA libraries are CUDA_VERSION's and the
    compiler wheels exist. What this does not catch (a compile error, a missing system library)
    only a build finds: MEDCRITICAL_CUDA_IMAGE_TESTS=1."""
    args = _args(_dockerfile(kind))
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    project_layout.stub(stub / "pyproject.toml")
    for number, requirements in enumerate(_cuda_install_sets(kind, stub)):
        report = tmp_path / f"report{number}.json"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), *requirements],
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, f"{requirements}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        resolved = {
            item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text(encoding="utf-8"))["install"]
        }
        assert resolved["torch"] == args["TORCH_VERSION"]
        assert resolved["nvidia-cuda-runtime"].startswith(args["CUDA_VERSION"] + "."), resolved["nvidia-cuda-runtime"]
        if "medcritical" in resolved:
            for name in ("transformers", "trl", "peft", "accelerate"):
                assert f"=={resolved[name]}" == str(_pin(name).specifier), name
        if kind == "infer-cuda":
            assert resolved["vllm"] == args["VLLM_VERSION"]
        elif number == 0:
            assert resolved["nvidia-cuda-nvcc"].startswith(args["CUDA_VERSION"] + ".")
        else:
            assert resolved["deepspeed"] == args["DEEPSPEED_VERSION"]


cuda_images_enabled = pytest.mark.skipif(
    os.environ.get("MEDCRITICAL_DOCKER_TESTS") != "1" or os.environ.get("MEDCRITICAL_CUDA_IMAGE_TESTS") != "1",
    reason="builds a CUDA image (15 minutes or more cold, 15 to 20 GB of disk while building): set "
    "MEDCRITICAL_DOCKER_TESTS=1 MEDCRITICAL_CUDA_IMAGE_TESTS=1",
)


@pytest.mark.docker
@cuda_images_enabled
@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_cuda_image_builds_and_passes_its_smoke_test(kind, docker_engine):
    """images/local/build-cuda-images.sh (debootstrap base, no registry), then images/smoke-test.sh:
    the CLI, the pinned versions, torch.version.cuda, the user and folders as the Jobs run them, and
    for the training image DeepSpeed's prebuilt ops and no CUDA compiler left in the image."""
    result = subprocess.run(
        [str(IMAGES / "local" / "build-cuda-images.sh"), kind],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "SMOKE": "0"},
        capture_output=True,
        text=True,
        timeout=4 * 3600,
    )
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    summary = _smoke(f"medcritical-{kind}:{PYPROJECT['project']['version']}")
    args = _args(_dockerfile(kind))
    assert summary["torch_cuda"] == args["CUDA_VERSION"] and not summary["cuda_available"]
    if kind == "train-cuda":
        assert {"cpu_adam", "fused_adam"} <= set(summary["ds_report_installed"])
        assert summary["nvcc"] is None
    else:
        assert summary["vllm"] == args["VLLM_VERSION"]

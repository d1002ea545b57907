"""The cluster tier (marker `cluster`): the suite's manifests on a real Kubernetes.

Which cluster: with MEDCRITICAL_CLUSTER=local (the default when CI=true) the one-node cluster of
k8s/local/cluster.sh, built from source on this machine, brought up here (or reused when it is up)
and torn down at the end if this run brought it up; the CPU image is built and loaded into it.
Without it, the current kube context, whose nodes must be able to run `medcritical-cpu:<version>`
(e.g. `kind load docker-image`); skipped, with the reason, when no cluster answers, except in CI:
there a cluster that cannot come up FAILS the tier.

What runs, in order (each test needs the ones before it):
  - k8s/base, the medcritical-s3 Secret (random keys), MinIO from the dev overlay (k8s/local/dev on
    the local cluster: only MinIO's image differs) and its bucket Job;
  - every single-step Job of k8s/jobs through its CPU overlay (k8s/overlays/cpu/<step>), in the
    pipeline's order, each reading the previous one's outputs from MinIO; its outputs are checked
    in MinIO; then the demo Job (the whole method in one pod);
  - Kubeflow Trainer v2.2 and JobSet (cluster.sh trainer), then the CPU overlay of sft-multinode:
    a TrainJob of two pods that rendezvous over the cluster network (gloo) and train the tiny
    model; then the pipeline's own TrainJob launch (medcritical.platform.trainjob) on the same path;
  - every TrainJob and PyTorchJob manifest of k8s/jobs through a server-side dry run with strict
    field validation against the installed CRDs.
A failed Job fails its test with the Job's condition and the pod's logs.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.test_k8s_manifests import K8S, _kubectl, _project_version

pytestmark = pytest.mark.cluster

NAMESPACE = "medcritical"
CLUSTER_SH = K8S / "local" / "cluster.sh"
IN_CI = os.environ.get("CI") == "true"
MODE = os.environ.get("MEDCRITICAL_CLUSTER", "local" if IN_CI else "")
JOB_TIMEOUT_S = int(os.environ.get("MEDCRITICAL_CLUSTER_JOB_TIMEOUT", "1200"))
# The steps of k8s/jobs in the pipeline's order, with the folder each writes under MEDCRITICAL_RUN
# and the file that says it finished.
STEPS = [
    ("prepare-data", "data", "data_stats.json"),
    ("distill", "distill", "distill_stats.json"),
    ("sft", "sft", "sft_metrics.json"),
    ("rollout", "round1-rollout", "rollout_stats.json"),
    ("dpo", "round1-dpo", "dpo_metrics.json"),
    ("evaluate", "eval-dpo-round1", "report.json"),
]
CPU_RUN = "runs/cpu"
MULTINODE = [
    ("sft-multinode", "trainjobs.trainer.kubeflow.org"),
    ("dpo-multinode", "trainjobs.trainer.kubeflow.org"),
    ("sft-multinode-legacy", "pytorchjobs.kubeflow.org"),
    ("dpo-multinode-legacy", "pytorchjobs.kubeflow.org"),
]


@functools.cache
def _cluster_kubectl() -> str:
    """The local cluster's own kubectl (its version) when the tier runs there; else the test extras' one."""
    if MODE == "local":
        env = subprocess.run(["bash", str(CLUSTER_SH), "env"], capture_output=True, text=True, check=True).stdout
        built = Path(re.search(r"PATH=(\S+):", env).group(1)) / "kubectl"
        if built.is_file():
            return str(built)
    return _kubectl()


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess:
    result = subprocess.run([_cluster_kubectl(), *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result


def _cluster_sh(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout)


def _unavailable(reason: str):
    """No cluster: a failure in CI (the tier must run there), a skip elsewhere."""
    if IN_CI or MODE == "local":
        pytest.fail(reason)
    pytest.skip(reason)


def _bring_up_local() -> bool:
    """Bring the local cluster up unless it runs; True when this call started it."""
    if os.geteuid() != 0:
        _unavailable("MEDCRITICAL_CLUSTER=local needs root (containerd, kubelet, the pod network)")
    was_up = _cluster_sh("status", timeout=60).returncode == 0
    started = time.monotonic()
    try:
        up = _cluster_sh("up", timeout=3600)
    except subprocess.TimeoutExpired:
        _unavailable("k8s/local/cluster.sh up did not finish in an hour")
    if up.returncode != 0:
        _unavailable(f"k8s/local/cluster.sh up failed (exit {up.returncode}):\n{up.stderr[-4000:]}")
    print(f"local cluster {'reused' if was_up else 'up'} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    started = time.monotonic()
    for command in (["bash", str(K8S / "local" / "build-cpu-image.sh")], None):
        if command is None:
            result = _cluster_sh("load", f"medcritical-cpu:{_project_version()}", timeout=1800)
        else:
            result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            _unavailable(f"the CPU image could not be built or loaded:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    print(f"CPU image built and loaded in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return not was_up


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as env:
        started_here = False
        if MODE == "local":
            started_here = _bring_up_local()
            env.setenv(
                "KUBECONFIG",
                os.environ.get("MEDCRITICAL_KUBECONFIG", str(Path.home() / ".kube/medcritical-local.config")),
            )
        try:
            result = kubectl("version", "--request-timeout=5s", "-o", "json", check=False, timeout=30)
        except subprocess.TimeoutExpired:
            _unavailable("no Kubernetes cluster reachable (kubectl version timed out)")
        if result.returncode != 0 or "serverVersion" not in result.stdout:
            reason = (result.stderr.strip().splitlines() or ["no server version"])[-1]
            _unavailable(f"no Kubernetes cluster reachable from the kube context: {reason}")
        try:
            yield json.loads(result.stdout)["serverVersion"]
        finally:
            if started_here and os.environ.get("MEDCRITICAL_CLUSTER_KEEP") != "1":
                down = _cluster_sh("down", timeout=600)
                assert down.returncode == 0, f"k8s/local/cluster.sh down failed:\n{down.stderr[-3000:]}"


def _apply(directory: Path) -> None:
    """Build a kustomization and apply it, with the CPU image replaced when one is given."""
    manifest = kubectl("kustomize", str(directory)).stdout
    image = os.environ.get("MEDCRITICAL_CPU_IMAGE")
    if image:
        manifest = manifest.replace(f"image: medcritical-cpu:{_project_version()}", f"image: {image}")
    kubectl("apply", "-f", "-", stdin=manifest)


def _ensure_s3_secret() -> None:
    # MinIO's root user (MinIO and its bucket Job only); the steps' medcritical-s3 keys become a user limited to
    # the bucket. Each checked on its own: a cluster kept from before has medcritical-s3 but not the root one.
    _ensure_secret(
        "medcritical-minio-root",
        {"MINIO_ROOT_USER": f"root-{secrets.token_hex(4)}", "MINIO_ROOT_PASSWORD": secrets.token_hex(20)},
    )
    _ensure_secret(
        "medcritical-s3",
        {
            "MEDCRITICAL_S3_ENDPOINT": f"http://minio.{NAMESPACE}.svc:9000",
            "AWS_ACCESS_KEY_ID": f"medcritical-{secrets.token_hex(4)}",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
            "AWS_REGION": "us-east-1",
        },
    )


def _ensure_secret(name: str, data: dict[str, str]) -> None:
    """Create the Secret `name` with `data` unless it exists (a kept cluster keeps its keys)."""
    if kubectl("-n", NAMESPACE, "get", "secret", name, check=False).returncode == 0:
        return
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE}}
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(secret | {"stringData": data}))


def _s3_keys() -> dict[str, str]:
    data = json.loads(kubectl("-n", NAMESPACE, "get", "secret", "medcritical-s3", "-o", "json").stdout)["data"]
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def _job_logs(name: str) -> str:
    logs = kubectl("-n", NAMESPACE, "logs", f"job/{name}", "--tail=80", check=False)
    return logs.stdout + logs.stderr


def _wait_for_job(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = json.loads(kubectl("-n", NAMESPACE, "get", "job", name, "-o", "json").stdout)
        conditions = {c["type"]: c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
        if "Complete" in conditions:
            return
        if "Failed" in conditions:
            pytest.fail(f"job {name} failed: {conditions['Failed'].get('message')}\n{_job_logs(name)}")
        time.sleep(5)
    pytest.fail(
        f"job {name} did not finish in {timeout_s:.0f}s:\n{_cluster_state(f'job-name={name}')}\n{_job_logs(name)}"
    )


def _cluster_state(selector: str) -> str:
    """What a stuck pod's cause usually is in: the pods, the namespace's last events, and the node's conditions
    (DiskPressure once deleted the node's own images here, and no pod sandbox could start)."""
    pods = kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "wide", check=False).stdout
    events = kubectl("-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]
    nodes = kubectl(
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*].status.conditions[?(@.status=='True')]}{.type} {.message}{'\\n'}{end}",
        check=False,
    ).stdout
    return f"{pods}\n{events}\nnode conditions:\n{nodes}"


@contextlib.contextmanager
def minio_client():
    """A MinIO client on this machine, through `kubectl port-forward` to the dev overlay's Service."""
    from minio import Minio

    forward = subprocess.Popen(
        [_cluster_kubectl(), "-n", NAMESPACE, "port-forward", "svc/minio", ":9000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = forward.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert port, f"kubectl port-forward said {line!r} {forward.stderr.read() if forward.poll() is not None else ''}"
        keys = _s3_keys()
        yield (
            Minio(
                f"127.0.0.1:{port.group(1)}",
                access_key=keys["AWS_ACCESS_KEY_ID"],
                secret_key=keys["AWS_SECRET_ACCESS_KEY"],
                secure=False,
                region=keys.get("AWS_REGION"),
            ),
            f"http://127.0.0.1:{port.group(1)}",
            keys,
        )
    finally:
        forward.terminate()
        forward.wait(timeout=30)


def _objects(prefix: str) -> list[str]:
    with minio_client() as (client, _, _):
        return [o.object_name for o in client.list_objects("medcritical", prefix=prefix, recursive=True)]


def _run_job(overlay: Path, name: str) -> float:
    kubectl("-n", NAMESPACE, "delete", "job", name, "--ignore-not-found", "--wait=true", timeout=300)
    started = time.monotonic()
    _apply(overlay)
    _wait_for_job(name, JOB_TIMEOUT_S)
    return time.monotonic() - started


# ---- MinIO from the dev overlay ----


local_only = pytest.mark.skipif(MODE != "local", reason="checks the cluster k8s/local/cluster.sh runs")


@local_only
def test_local_kubelet_never_collects_the_images_it_cannot_pull_back(cluster):
    """No registry can give the node its images back, so the kubelet must not evict for disk or collect images:
    in CI a disk-pressure eviction once deleted the pause image and no pod could start after it. The running
    kubelet's own configuration is read, so a default merged back in would show."""
    config = json.loads(kubectl("get", "--raw", "/api/v1/nodes/medcritical-node/proxy/configz").stdout)
    kubelet = config["kubeletconfig"]
    assert set(kubelet["evictionHard"]) == {"memory.available"}, kubelet["evictionHard"]
    assert kubelet["imageGCHighThresholdPercent"] == 100


@local_only
def test_local_load_replaces_an_earlier_version_of_an_image(cluster, tmp_path):
    """A rebuilt image replaces its predecessor in the node's containerd under every name, the runtime's
    sha256: ID included (that name kept each earlier 6 GB CPU image before)."""
    ctr = ["ctr", "--address", "/run/medcritical-cluster/containerd/containerd.sock", "-n", "k8s.io", "images"]
    image = "localhost/medcritical-load-test:1"
    ids = []
    try:
        for n in (1, 2):
            (tmp_path / "Dockerfile").write_text(f"FROM localhost/medcritical-pause:3.10\nLABEL build={n}\n")
            subprocess.run(["docker", "build", "-q", "-t", image, str(tmp_path)], check=True, capture_output=True)
            ids.append(
                subprocess.run(
                    ["docker", "image", "inspect", "-f", "{{.Id}}", image], check=True, capture_output=True, text=True
                ).stdout.strip()
            )
            loaded = _cluster_sh("load", image, timeout=300)
            assert loaded.returncode == 0, loaded.stderr
            # The runtime adds the sha256: name itself once it has used or listed an image (when exactly
            # varies); name it so here, as it would.
            subprocess.run([*ctr, "tag", "--force", image, ids[-1]], check=True, capture_output=True)
        refs = subprocess.run([*ctr, "ls", "-q"], check=True, capture_output=True, text=True).stdout.split()
        assert image in refs
        assert ids[0] not in refs, f"the first build is still in containerd as {ids[0]}"
        digests = {
            line.split()[2]
            for line in subprocess.run([*ctr, "ls"], check=True, capture_output=True, text=True).stdout.splitlines()[1:]
            if line.split()[0] == image
        }
        assert len(digests) == 1
    finally:
        refs = subprocess.run([*ctr, "ls", "-q"], capture_output=True, text=True).stdout.split()
        subprocess.run([*ctr, "rm", *[r for r in refs if r == image or r in ids]], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", image, *ids], capture_output=True)  # both builds


def test_dev_overlay_brings_up_minio_and_its_bucket(cluster):
    kubectl("apply", "-k", str(K8S / "base"))
    _ensure_s3_secret()
    # A bucket Job of an earlier run (kept 10 min) would refuse the changed pod template; it is idempotent.
    kubectl("-n", NAMESPACE, "delete", "job", "minio-create-buckets", "--ignore-not-found", "--wait=true", timeout=300)
    _apply(K8S / "local" / "dev" if MODE == "local" else K8S / "overlays" / "dev")
    rollout = kubectl(
        "-n", NAMESPACE, "rollout", "status", "deployment/minio", "--timeout=300s", timeout=330, check=False
    )
    if rollout.returncode != 0:
        pytest.fail(
            f"MinIO did not come up: {rollout.stderr.strip()}\n{_cluster_state('app.kubernetes.io/name=minio')}"
        )
    _wait_for_job("minio-create-buckets", 300)
    pvc = json.loads(kubectl("-n", NAMESPACE, "get", "pvc", "minio-data", "-o", "json").stdout)
    assert pvc["status"]["phase"] == "Bound", pvc["status"]
    with minio_client() as (client, _, _):
        assert client.bucket_exists("medcritical")
        # The steps' keys are a user limited to the bucket (the bucket Job's policy), not MinIO's root user.
        from minio.error import S3Error

        with pytest.raises(S3Error, match="AccessDenied|Access Denied"):
            client.make_bucket("medcritical-not-allowed")


# ---- every step Job, in order, through the CPU overlay ----


@pytest.mark.parametrize("step, folder, done", STEPS, ids=[s[0] for s in STEPS])
def test_step_job_runs_to_completion_through_the_cpu_overlay(cluster, step, folder, done):
    seconds = _run_job(K8S / "overlays" / "cpu" / step, f"medcritical-{step}")
    names = _objects(f"{CPU_RUN}/{folder}/")
    assert f"{CPU_RUN}/{folder}/{done}" in names, f"job medcritical-{step} completed but {done} is not in {names[:30]}"
    if step == "sft":
        assert any(n.startswith(f"{CPU_RUN}/{folder}/model/") for n in names), names[:30]
    if step == "dpo":  # a round without preference pairs (the tiny model may give none) points at its input
        assert any(n.startswith(f"{CPU_RUN}/{folder}/model/") for n in names) or (
            f"{CPU_RUN}/{folder}/model.uri" in names
        ), names[:30]
    pod = json.loads(
        kubectl("-n", NAMESPACE, "get", "pods", "-l", f"job-name=medcritical-{step}", "-o", "json").stdout
    )["items"][-1]
    # The shipped security context held: the step ran as UID 10001 on a read-only root filesystem.
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    print(f"job {step}: {seconds:.0f}s, {len(names)} objects under {CPU_RUN}/{folder}/", file=sys.stderr)


def test_demo_job_runs_the_whole_method(cluster):
    seconds = _run_job(K8S / "overlays" / "cpu" / "demo", "medcritical-demo")
    names = _objects("runs/demo/")
    assert any(name.endswith("report.json") for name in names), f"no report.json among {names[:20]}"
    # `medcritical run` in the pod (the image's user, its security context) ran the stages in forks of its warm
    # worker, not each in a fresh Python: a fallback would only be slower, so only the log tells.
    logs = kubectl("-n", NAMESPACE, "logs", "job/medcritical-demo", timeout=120).stdout
    assert logs.count("running in a fork") == 9 and "warm worker not used" not in logs, logs[-4000:]
    print(f"job demo: {seconds:.0f}s, {len(names)} objects under runs/demo/", file=sys.stderr)


# ---- Kubeflow Trainer v2: a TrainJob of two nodes ----


@pytest.fixture(scope="module")
def trainer(cluster):
    if MODE == "local":
        result = _cluster_sh("trainer", timeout=3600)
        if result.returncode != 0:
            pytest.fail(f"k8s/local/cluster.sh trainer failed:\n{result.stderr[-4000:]}")
    elif kubectl("get", "crd", "trainjobs.trainer.kubeflow.org", check=False).returncode != 0:
        _unavailable("the cluster has no Kubeflow Trainer v2 (trainjobs.trainer.kubeflow.org)")
    runtime = kubectl("get", "clustertrainingruntime", "torch-distributed", check=False)
    if runtime.returncode != 0:
        _unavailable(f"no torch-distributed ClusterTrainingRuntime: {runtime.stderr.strip()}")


def _wait_for_trainjob(name: str, timeout_s: float) -> dict:
    """The finished TrainJob; on failure the test's message has the pods' last logs. JobSet deletes a failed
    job's pods at once, so the logs are read on every poll while the pods live, not after the failure."""
    deadline = time.monotonic() + timeout_s
    selector = f"jobset.sigs.k8s.io/jobset-name={name}"
    last_logs = ""
    while time.monotonic() < deadline:
        job = json.loads(kubectl("-n", NAMESPACE, "get", "trainjob", name, "-o", "json").stdout)
        conditions = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
        if "Complete" in conditions:
            return job
        last_logs = _trainjob_pods_now(name) or last_logs
        if "Failed" in conditions:
            events = kubectl("-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout
            pytest.fail(
                f"TrainJob {name} failed: {conditions['Failed'].get('message')}\n"
                f"the pods' last logs:\n{last_logs}\nevents:\n{events[-3000:]}"
            )
        time.sleep(5)
    pods = kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "wide", check=False).stdout
    pytest.fail(f"TrainJob {name} did not finish in {timeout_s:.0f}s:\n{pods}\n{last_logs}")


def _trainjob_pods_now(name: str) -> str:
    """How a TrainJob's pods' containers last ended and their logs (a crashed container's previous run too); ""
    while it has no pods."""
    selector = f"jobset.sigs.k8s.io/jobset-name={name}"
    ended = "{range .items[*]}{.metadata.name}: {.status.containerStatuses[0].lastState.terminated.reason} exit {.status.containerStatuses[0].lastState.terminated.exitCode}{'\\n'}{end}"
    pods = kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "name", check=False).stdout.split()
    if not pods:
        return ""
    texts = [kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", f"jsonpath={ended}", check=False).stdout]
    for pod in pods:
        for previous in ((), ("--previous",)):
            logs = kubectl("-n", NAMESPACE, "logs", pod, "--tail=60", *previous, check=False).stdout
            if logs:
                texts.append(f"--- {pod}{' (previous run)' if previous else ''}\n{logs}")
    return "\n".join(texts)


@contextlib.contextmanager
def _trainjob_logs_on_failure(name: str):
    """For a TrainJob created by code under test: `_trainjob_pods_now` is read every few seconds while the block
    runs, and a failure in the block fails the test with the last one read (JobSet deletes a failed job's pods
    at once)."""
    last = {"logs": ""}
    done = threading.Event()

    def poll() -> None:
        while not done.wait(5):
            last["logs"] = _trainjob_pods_now(name) or last["logs"]

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    try:
        yield
    except Exception as e:
        pytest.fail(f"{type(e).__name__}: {e}\nthe TrainJob's pods, last read:\n{last['logs'][-8000:]}")
    finally:
        done.set()
        reader.join()


def _trainjob_pods(name: str) -> list[dict]:
    selector = f"jobset.sigs.k8s.io/jobset-name={name}"
    return json.loads(kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json").stdout)["items"]


def test_two_node_trainjob_trains_the_tiny_model(cluster, trainer):
    name = "medcritical-sft-multinode"
    kubectl("-n", NAMESPACE, "delete", "trainjob", name, "--ignore-not-found", "--wait=true", timeout=300)
    started = time.monotonic()
    _apply(K8S / "overlays" / "cpu" / "sft-multinode")
    _wait_for_trainjob(name, JOB_TIMEOUT_S)
    pods = _trainjob_pods(name)
    assert len(pods) == 2 and all(p["status"]["phase"] == "Succeeded" for p in pods), [
        (p["metadata"]["name"], p["status"]["phase"]) for p in pods
    ]
    names = _objects(f"{CPU_RUN}/sft-multinode/")
    assert f"{CPU_RUN}/sft-multinode/sft_metrics.json" in names, names[:30]
    assert any(n.startswith(f"{CPU_RUN}/sft-multinode/model/") for n in names), names[:30]
    # torchrun formed one group of two processes across the two pods (gloo over the pod network).
    metrics = _read_json(f"{CPU_RUN}/sft-multinode/sft_metrics.json")
    assert metrics["world_size"] == 2 and metrics["steps"] > 0, metrics
    print(f"TrainJob {name}: {time.monotonic() - started:.0f}s on 2 pods", file=sys.stderr)


def _read_json(key: str) -> dict:
    with minio_client() as (client, _, _):
        response = client.get_object("medcritical", key)
        try:
            return json.loads(response.read())
        finally:
            response.close()
            response.release_conn()


def test_pipeline_trainjob_launch_trains_on_two_nodes(cluster, trainer):
    """What the pipeline's sft task does with train_nodes=2 (medcritical.platform.trainjob.run_component_on_nodes):
    the same TrainJob path, created through the Kubernetes API, its metrics read back from S3."""
    from kubernetes import client, config

    from medcritical.platform import trainjob
    from tests.test_trainjob_launch import CPU_RECIPE_TWO_RANKS as recipe  # the CPU recipe's batch, on two ranks

    run_root = "s3://medcritical/runs/cpu-pipeline"
    api = client.CustomObjectsApi(config.new_client_from_config())
    logged = {}

    class Metrics:
        def log_metric(self, key, value):
            logged[key] = value

    with minio_client() as (_, endpoint, keys), pytest.MonkeyPatch.context() as env:
        env.setenv("MEDCRITICAL_S3_ENDPOINT", endpoint)  # this process reads the metrics through the forward
        env.setenv("AWS_ACCESS_KEY_ID", keys["AWS_ACCESS_KEY_ID"])
        env.setenv("AWS_SECRET_ACCESS_KEY", keys["AWS_SECRET_ACCESS_KEY"])
        with _trainjob_logs_on_failure(trainjob.trainjob_name("sft", f"{run_root}/sft")):
            output = trainjob.run_component_on_nodes(
                "sft",
                recipe,
                run_root,
                "sft",
                Metrics(),
                nodes=2,
                gpus_per_node=0,
                image=f"medcritical-cpu:{_project_version()}",
                s3_secret="medcritical-s3",
                api=api,
                namespace=NAMESPACE,
                distill=f"s3://medcritical/{CPU_RUN}/distill",
                model="",
            )
    assert output == f"{run_root}/sft"
    assert logged.get("world_size") == 2, logged
    # Its output is in S3, so the task deleted the completed TrainJob (its JobSet and pods go with it).
    name = trainjob.trainjob_name("sft", f"{run_root}/sft")
    trainjobs = (trainjob.GROUP, trainjob.VERSION, NAMESPACE, trainjob.PLURAL)
    assert _gone_within(lambda: api.get_namespaced_custom_object(*trainjobs, name), 60), name
    names = _objects("runs/cpu-pipeline/sft/")
    assert any(n.startswith("runs/cpu-pipeline/sft/model/") for n in names), names[:30]


def _gone_within(get, seconds: float) -> bool:
    """Whether `get` answers 404 (the object is deleted) within `seconds`."""
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            get()
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        time.sleep(2)
    return False


# ---- strict server-side validation of every TrainJob and PyTorchJob ----


@pytest.mark.parametrize("directory, crd", MULTINODE, ids=[m[0] for m in MULTINODE])
def test_multinode_jobs_pass_strict_server_side_validation(cluster, trainer, directory, crd):
    """The API server checks the real CRD (schema, CEL rules) and Trainer's webhook: a server-side dry
    run, strict, so an unknown field is an error instead of being dropped."""
    if kubectl("get", "crd", crd, check=False).returncode != 0:
        _unavailable(f"the cluster has no {crd}")
    kubectl("apply", "-k", str(K8S / "base"))
    objects = [
        yaml.safe_load(doc) for doc in kubectl("kustomize", str(K8S / "jobs" / directory)).stdout.split("\n---\n")
    ]
    job = next(o for o in objects if o["kind"] in ("TrainJob", "PyTorchJob"))
    # Checked as a new object: an earlier test's TrainJob of the same name would make this an update, and the
    # server refuses changes to a TrainJob's spec as immutable.
    job["metadata"]["name"] += "-dry-run"
    kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=yaml.safe_dump_all(objects))
    job["spec"]["unknownField"] = 1
    result = kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=yaml.safe_dump(job), check=False
    )
    assert result.returncode != 0 and "unknownField" in result.stderr, result.stderr

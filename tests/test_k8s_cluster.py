"""On a real cluster (marker `cluster`): the dev overlay comes up and the demo Job writes to MinIO.

Needs a reachable kube context (a local kind cluster or any cluster where you may create the
`medcritical` namespace) whose nodes can run the CPU image: `kind load docker-image
medcritical-cpu:<version>`, or MEDCRITICAL_CPU_IMAGE=<registry image>. Skipped, with the reason,
when no cluster answers. Run with `make test-cluster` (docs/kubernetes.md).

Also, where the cluster has Kubeflow Trainer v2 or the v1 training operator, the multi-node jobs
pass the API server's own validation (a server-side dry run of the real CRDs).

What it does: applies k8s/base, creates the medcritical-s3 Secret with random keys if it is missing,
applies k8s/overlays/dev (MinIO and the bucket Job), runs k8s/jobs/demo (the whole method on CPU
with the tiny model), waits for it to complete, and lists the run's objects in MinIO through
`kubectl port-forward`. MinIO and the namespace stay for inspection; the demo Job is replaced on
the next run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_k8s_manifests import K8S, _kubectl, _project_version

pytestmark = pytest.mark.cluster

NAMESPACE = "medcritical"
TIMEOUT_S = int(os.environ.get("MEDCRITICAL_CLUSTER_TIMEOUT", "1800"))


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    result = subprocess.run([_kubectl(), *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def cluster():
    try:
        result = kubectl("version", "--request-timeout=5s", "-o", "json", check=False, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("no Kubernetes cluster reachable (kubectl version timed out)")
    if result.returncode != 0 or "serverVersion" not in result.stdout:
        reason = (result.stderr.strip().splitlines() or ["no server version"])[-1]
        pytest.skip(f"no Kubernetes cluster reachable from the current kube context: {reason}")
    return json.loads(result.stdout)["serverVersion"]


def _apply(directory: Path) -> None:
    """Build a kustomization and apply it, with the CPU image replaced when one is given."""
    manifest = kubectl("kustomize", str(directory)).stdout
    image = os.environ.get("MEDCRITICAL_CPU_IMAGE")
    if image:
        manifest = manifest.replace(f"image: medcritical-cpu:{_project_version()}", f"image: {image}")
    kubectl("apply", "-f", "-", stdin=manifest)


def _ensure_s3_secret() -> None:
    if kubectl("-n", NAMESPACE, "get", "secret", "medcritical-s3", check=False).returncode == 0:
        return
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "medcritical-s3", "namespace": NAMESPACE},
        "stringData": {
            "MEDCRITICAL_S3_ENDPOINT": f"http://minio.{NAMESPACE}.svc:9000",
            "AWS_ACCESS_KEY_ID": f"medcritical-{secrets.token_hex(4)}",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
            "AWS_REGION": "us-east-1",
        },
    }
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(secret))


def _s3_keys() -> dict[str, str]:
    data = json.loads(kubectl("-n", NAMESPACE, "get", "secret", "medcritical-s3", "-o", "json").stdout)["data"]
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def _wait_for_job(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = json.loads(kubectl("-n", NAMESPACE, "get", "job", name, "-o", "json").stdout)
        conditions = {c["type"]: c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
        if "Complete" in conditions:
            return
        if "Failed" in conditions:
            logs = kubectl("-n", NAMESPACE, "logs", f"job/{name}", "--tail=60", check=False)
            pytest.fail(f"job {name} failed: {conditions['Failed'].get('message')}\n{logs.stdout}{logs.stderr}")
        time.sleep(5)
    pods = kubectl("-n", NAMESPACE, "get", "pods", "-l", f"job-name={name}", "-o", "wide", check=False).stdout
    pytest.fail(f"job {name} did not finish in {timeout_s:.0f}s:\n{pods}")


def test_dev_overlay_and_demo_job_write_to_minio(cluster):
    kubectl("apply", "-k", str(K8S / "base"))
    _ensure_s3_secret()
    _apply(K8S / "overlays" / "dev")
    kubectl("-n", NAMESPACE, "rollout", "status", "deployment/minio", "--timeout=300s", timeout=330)
    _wait_for_job("minio-create-buckets", 300)

    kubectl("-n", NAMESPACE, "delete", "job", "medcritical-demo", "--ignore-not-found", "--wait=true", timeout=180)
    _apply(K8S / "jobs" / "demo")
    _wait_for_job("medcritical-demo", TIMEOUT_S)

    # The run's outputs, read back from MinIO through a port-forward to this machine.
    forward = subprocess.Popen(
        [_kubectl(), "-n", NAMESPACE, "port-forward", "svc/minio", ":9000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = forward.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert port, f"kubectl port-forward said {line!r} {forward.stderr.read() if forward.poll() is not None else ''}"
        from minio import Minio

        keys = _s3_keys()
        client = Minio(
            f"127.0.0.1:{port.group(1)}",
            access_key=keys["AWS_ACCESS_KEY_ID"],
            secret_key=keys["AWS_SECRET_ACCESS_KEY"],
            secure=False,
            region=keys.get("AWS_REGION"),
        )
        names = [o.object_name for o in client.list_objects("medcritical", prefix="runs/demo/", recursive=True)]
    finally:
        forward.terminate()
        forward.wait(timeout=30)
    assert names, "the demo Job completed but wrote nothing under s3://medcritical/runs/demo/"
    assert any(name.endswith("report.json") for name in names), f"no report.json among {names[:20]}"
    print(
        f"{len(names)} objects under s3://medcritical/runs/demo/ on Kubernetes {cluster.get('gitVersion')}",
        file=sys.stderr,
    )


@pytest.mark.parametrize(
    "directory, crd",
    [
        ("sft-multinode", "trainjobs.trainer.kubeflow.org"),
        ("dpo-multinode", "trainjobs.trainer.kubeflow.org"),
        ("sft-multinode-legacy", "pytorchjobs.kubeflow.org"),
        ("dpo-multinode-legacy", "pytorchjobs.kubeflow.org"),
    ],
)
def test_multinode_jobs_pass_the_servers_own_validation(cluster, directory, crd):
    """The API server checks the real CRD (and its CEL rules, webhooks) with a server-side dry run:
    what the vendored schema subsets in k8s/crds/ approximate offline."""
    if kubectl("get", "crd", crd, check=False).returncode != 0:
        pytest.skip(f"the cluster has no {crd} (install Kubeflow Trainer v2 or the v1 training operator)")
    kubectl("apply", "-k", str(K8S / "base"))
    manifest = kubectl("kustomize", str(K8S / "jobs" / directory)).stdout
    kubectl("apply", "--dry-run=server", "-f", "-", stdin=manifest)

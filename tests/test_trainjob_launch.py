"""The pipeline's multi-node path: the TrainJob the sft/dpo task builds (checked like the shipped
manifests) and how the task waits for it (its error handling, against a recording API object)."""

import pytest
from kubernetes.client.exceptions import ApiException

from medcritical.orchestration.recipe import dump_recipe, load_recipe
from medcritical.platform import plan, trainjob
from tests import k8s_rules
from tests.test_k8s_manifests import ROOT, build, documented_secrets, schema_errors

RECIPE = dump_recipe(load_recipe(ROOT / "recipes" / "full-zero3-8gpu.yaml"))
INPUTS = {"distill": "s3://b/runs/1/distill", "model": ""}
CPU_RECIPE = (ROOT / "k8s" / "components" / "cpu" / "recipe.yaml").read_text(encoding="utf-8")
# The same global batch (8) as accumulation 2 x 4, which two ranks share (each rank: 1 x 4).
CPU_RECIPE_TWO_RANKS = CPU_RECIPE.replace(
    "per_device_train_batch_size: 8\n", "per_device_train_batch_size: 4\n    gradient_accumulation_steps: 2\n", 1
)


def manifest(nodes=2, gpus=8, recipe=RECIPE):
    return trainjob.trainjob_manifest(
        "sft",
        recipe,
        "s3://b/runs/1/sft",
        INPUTS,
        image="reg/medcritical-train-cuda:0.1.0",
        nodes=nodes,
        gpus_per_node=gpus,
        s3_secret="medcritical-s3",
    )


def test_a_trainjob_on_cpu_nodes_runs_one_process_per_node_without_gpus():
    """train_nodes=2 train_gpus=0: CPU nodes (the local cluster's two-node SFT); it used to ask for
    numProcPerNode 0, cpu "0" and nvidia.com/gpu "0"."""
    job = manifest(gpus=0, recipe=CPU_RECIPE_TWO_RANKS)
    job["metadata"]["namespace"] = "kubeflow"
    assert schema_errors(job) == []
    trainer = job["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1 and trainer["numNodes"] == 2
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in trainer["resourcesPerNode"][kind]
    assert trainer["resourcesPerNode"]["requests"]["cpu"] == "500m"
    volumes = {v["name"]: v for v in plan.node_pod_patches(job["spec"])[0]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "1Gi"  # not the GPU nodes' 64Gi, counted in memory


def test_the_launched_trainjob_passes_the_schema_and_project_rules():
    job = manifest()
    job["metadata"]["namespace"] = "kubeflow"
    assert schema_errors(job) == []
    violations = k8s_rules.check(
        [job], external_secrets=documented_secrets(), provided=build(ROOT / "k8s" / "overlays" / "pipeline-rbac")
    )
    assert [str(v) for v in violations] == []
    node = k8s_rules.trainjob_pod(job["spec"])["containers"][0]
    assert node["args"][:4] == ["-m", "medcritical.cli", "stage", "sft"]
    assert "distill=s3://b/runs/1/distill" in node["args"] and "model=" not in node["args"]
    assert node["command"][:2] == ["sh", "-c"] and "exec torchrun" in node["command"][2]


def test_the_trainjob_is_sized_by_the_plan():
    from medcritical.platform.plan import check, given_from_trainjob, plan_steps, quantity

    job = manifest()
    given = given_from_trainjob("TrainJob/x", job)
    need = plan_steps(load_recipe(ROOT / "recipes" / "full-zero3-8gpu.yaml"), train_gpus=8, nodes=2)["sft"]
    assert given.step == "sft" and given.gpus == 8 and given.nodes == 2
    assert check(need, given, quantity("80Gi")) == []


class RecordingApi:
    """Answers like the Kubernetes API for one TrainJob: the states given, in order (GONE: a 404); each create
    after the first is refused with `create_error` once."""

    def __init__(self, states, create_error=None, delete_error=None):
        self.states, self.create_error, self.delete_error = list(states), create_error, delete_error
        self.created, self.polled, self.deleted = [], [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.create_error:
            error, self.create_error = self.create_error, None
            raise ApiException(status=error)
        self.created.append((group, version, namespace, plural, body["metadata"]["name"]))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.polled.append((group, version, namespace, plural, name))
        answer = self.states.pop(0)
        if answer is GONE:
            raise ApiException(status=404)
        return answer

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        if self.delete_error:
            raise ApiException(status=self.delete_error)
        self.deleted.append((name, body["propagationPolicy"]))


GONE = object()


def state(kind, **extra):
    return {"status": {"conditions": [{"type": kind, "status": "True", **extra}]}}


def test_the_task_waits_until_the_trainjob_completes():
    api = RecordingApi([{}, state("Suspended"), state("Complete")])
    trainjob.run_trainjob(manifest(), "ns", api=api, sleep=lambda s: None)
    name = manifest()["metadata"]["name"]
    assert api.created == [("trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs", name)]
    assert api.states == []
    assert api.deleted == [(name, "Background")]  # its output is in S3: the finished JobSet and pods go


def test_a_retry_after_a_failed_trainjob_deletes_it_and_trains_again():
    # The first attempt's TrainJob failed (its pod was evicted, say); the task's retry must not read that failure
    # again: it deletes the TrainJob, waits until the name is free, creates it anew and waits for that one.
    name = manifest()["metadata"]["name"]
    api = RecordingApi(
        [state("Failed", reason="BackoffLimitExceeded"), state("Failed"), GONE, state("Complete")], create_error=409
    )
    last = trainjob.run_trainjob(manifest(), "ns", api=api, sleep=lambda s: None)
    assert last == state("Complete") and api.states == []
    assert api.deleted == [(name, "Foreground"), (name, "Background")]
    assert len(api.created) == 1  # the second create, once the old one was gone


def test_a_retry_that_may_not_delete_the_failed_trainjob_says_what_to_apply():
    api = RecordingApi([state("Failed")], create_error=409, delete_error=403)
    with pytest.raises(trainjob.TrainJobError, match=r"pipeline-rbac.*kubectl -n ns delete trainjob medcritical-sft"):
        trainjob.run_trainjob(manifest(), "ns", api=api, sleep=lambda s: None)


def test_a_completed_trainjob_the_task_may_not_delete_is_kept_and_the_step_succeeds(caplog):
    api = RecordingApi([state("Complete")], delete_error=403)
    assert trainjob.run_trainjob(manifest(), "ns", api=api, sleep=lambda s: None) == state("Complete")
    assert "completed and is kept: not allowed to delete it" in caplog.text


def test_a_retried_task_waits_for_the_trainjob_it_already_created():
    # The retry builds the same manifest: its name comes from the output URI, so the create answers 409.
    name = manifest()["metadata"]["name"]
    assert name == trainjob.trainjob_name("sft", "s3://b/runs/1/sft")
    api = RecordingApi([state("Suspended"), state("Complete")], create_error=409)
    last = trainjob.run_trainjob(manifest(), "ns", api=api, sleep=lambda s: None)
    assert api.polled == [("trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs", name)] * 2
    assert api.states == [] and last == state("Complete")  # waited past Suspended, until it completed


@pytest.mark.parametrize("status, words", [(404, "install Kubeflow Trainer v2"), (403, "k8s/overlays/pipeline-rbac")])
def test_missing_trainer_or_permission_is_named(status, words):
    with pytest.raises(trainjob.TrainJobError, match=words):
        trainjob.run_trainjob(manifest(), "ns", api=RecordingApi([], create_error=status), sleep=lambda s: None)


def test_a_failed_trainjob_fails_the_task_naming_it_and_its_logs():
    api = RecordingApi([state("Failed", reason="BackoffLimitExceeded", message="node-1 exited 1")])
    with pytest.raises(
        trainjob.TrainJobError,
        match=r"TrainJob ns/medcritical-sft-\w+ failed: BackoffLimitExceeded "
        r"node-1 exited 1; .*kubectl -n ns logs",
    ):
        trainjob.run_trainjob(manifest(), "ns", api=api, sleep=lambda s: None)


def test_the_pipeline_passes_train_nodes_to_the_training_tasks():
    import yaml

    pipeline_doc = next(yaml.safe_load_all((ROOT / "pipelines" / "medcritical.yaml").read_text()))
    for task in ("sft", "dpo"):
        inputs = pipeline_doc["root"]["dag"]["tasks"][task]["inputs"]["parameters"]
        assert inputs["train_nodes"] == {"componentInputParameter": "train_nodes"}
        assert inputs["trainjob_image"]["runtimeValue"]["constant"].startswith("medcritical-train-cuda:")


def test_the_component_path_returns_the_output_and_logs_the_trainjobs_metrics(tmp_path):
    import json

    class Metrics:
        def __init__(self):
            self.logged = {}

        def log_metric(self, key, value):
            self.logged[key] = value

    run_root = tmp_path / "run"
    (run_root / "sft").mkdir(parents=True)  # what rank 0 of the TrainJob publishes
    (run_root / "sft" / "sft_metrics.json").write_text(json.dumps({"train_loss": 0.5, "world_size": 16}))
    api, metrics = RecordingApi([state("Complete")]), Metrics()
    created = []
    api.create_namespaced_custom_object = lambda *args: created.append(args[-1])
    output = trainjob.run_component_on_nodes(
        "sft",
        RECIPE,
        str(run_root),
        "sft",
        metrics,
        nodes=2,
        gpus_per_node=8,
        image="img:1",
        s3_secret="s3",
        api=api,
        namespace="ns",
        **INPUTS,
    )
    assert output == f"{run_root}/sft" and metrics.logged == {"train_loss": 0.5, "world_size": 16}
    env = {e["name"]: e.get("value") for e in created[0]["spec"]["trainer"]["env"]}
    assert load_recipe_from_env(env).run.output_dir == str(run_root)  # the pipeline's run_root wins


def load_recipe_from_env(env):
    from medcritical.orchestration.recipe import load_recipe_text

    return load_recipe_text(env["MEDCRITICAL_RECIPE_YAML"])


def test_a_batch_the_nodes_cannot_keep_is_refused_before_any_trainjob_is_created():
    """Found on the local cluster: the CPU pipeline recipe (accumulation 1) on train_nodes=2 created a TrainJob
    whose every pod failed its retries with the global-batch error; the task now fails at once, naming the key."""
    from medcritical.orchestration.recipe import RecipeError

    api = RecordingApi([state("Complete")])
    with pytest.raises(RecipeError, match=r"sft\.trainer\.gradient_accumulation_steps is 1, not a multiple of the 2"):
        trainjob.run_component_on_nodes(
            "sft", CPU_RECIPE, "s3://bucket/runs/1", "sft", None, nodes=2, gpus_per_node=0, image="img:1",
            s3_secret="s3", api=api, namespace="ns", **INPUTS,
        )  # fmt: skip
    assert api.created == []
    # An accumulation both ranks can share reaches the TrainJob unchanged (each rank divides it).
    assert CPU_RECIPE_TWO_RANKS != CPU_RECIPE
    env = manifest(nodes=2, gpus=0, recipe=CPU_RECIPE_TWO_RANKS)["spec"]["trainer"]["env"]
    assert (
        load_recipe_from_env({e["name"]: e.get("value") for e in env}).sft.trainer["gradient_accumulation_steps"] == 2
    )


def test_gpu_product_and_kueue_queue_reach_the_trainjob():
    """The pipeline's gpu_product and kueue_queue: the TrainJob's GPU pods select the product's nodes and Kueue
    (the kueue.x-k8s.io/queue-name label on the TrainJob) admits it; "" sets neither."""
    job = trainjob.trainjob_manifest(
        "sft", RECIPE, "s3://b/runs/1/sft", INPUTS, image="img:1", nodes=2, gpus_per_node=8, s3_secret="s3",
        gpu_product="NVIDIA-H100-80GB-HBM3", kueue_queue="team-gpus", kueue_priority="training-high",
    )  # fmt: skip
    job["metadata"]["namespace"] = "kubeflow"
    assert schema_errors(job) == []
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    # Kueue's WorkloadPriorityClass: Trainer v2.2's runtimePatches have no priorityClassName (the schema check
    # above would refuse one).
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "training-high"
    pod = plan.node_pod_patches(job["spec"])[0]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    plain = manifest()
    assert not [label for label in plain["metadata"]["labels"] if label.startswith("kueue.x-k8s.io/")]
    assert "nodeSelector" not in plan.node_pod_patches(plain["spec"])[0]
    # CPU nodes (train_gpus=0) have no GPU product to select.
    cpu = trainjob.trainjob_manifest(
        "sft", CPU_RECIPE_TWO_RANKS, "s3://b/runs/1/sft", INPUTS, image="img:1", nodes=2, gpus_per_node=0,
        s3_secret="s3", gpu_product="NVIDIA-H100-80GB-HBM3", kueue_queue="cpu-queue",
    )  # fmt: skip
    assert "nodeSelector" not in plan.node_pod_patches(cpu["spec"])[0]
    assert cpu["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "cpu-queue"
    from medcritical.platform.scheduling import SchedulingError

    with pytest.raises(SchedulingError, match="kueue_queue='Team'"):
        trainjob.trainjob_manifest(
            "sft", RECIPE, "s3://b/runs/1/sft", INPUTS, image="img:1", nodes=2, gpus_per_node=8, s3_secret="s3",
            kueue_queue="Team",
        )  # fmt: skip


def test_the_component_passes_gpu_product_and_queue_to_the_trainjob(tmp_path):
    import json

    run_root = tmp_path / "run"
    (run_root / "sft").mkdir(parents=True)
    (run_root / "sft" / "sft_metrics.json").write_text(json.dumps({"train_loss": 0.5}))
    api, created = RecordingApi([state("Complete")]), []
    api.create_namespaced_custom_object = lambda *args: created.append(args[-1])

    class Metrics:
        def log_metric(self, key, value):
            pass

    trainjob.run_training_step(
        "sft", RECIPE, str(run_root), "sft", Metrics(), nodes=2, gpus_per_node=8, image="img:1", s3_secret="s3",
        gpu_product="NVIDIA-H200", kueue_queue="q1", kueue_priority="p1", api=api, namespace="ns", **INPUTS,
    )  # fmt: skip
    assert created[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q1"
    assert created[0]["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "p1"
    assert plan.node_pod_patches(created[0]["spec"])[0]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}

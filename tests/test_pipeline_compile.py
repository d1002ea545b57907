"""The compiled pipeline: drift from the source, strict parse, cluster settings, submission."""

import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from medcritical.pipeline_runner import compile_pipeline, submit_run
from medcritical.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "medcritical.yaml"
PAPER_RECIPE = REPO / "recipes" / "paper-7b-lora.yaml"


def compile_to(tmp_path, recipe_path=PAPER_RECIPE, **kwargs):
    return compile_pipeline(load_recipe(recipe_path), tmp_path / "p.yaml", **kwargs)


def test_checked_in_yaml_matches_the_source(tmp_path):
    fresh = compile_to(tmp_path).read_text()
    assert fresh == COMPILED.read_text(), (
        "pipelines/medcritical.yaml is stale; regenerate it with\n"
        "  medcritical compile --recipe recipes/paper-7b-lora.yaml --output pipelines/medcritical.yaml"
    )


def test_compiled_yaml_parses_strictly_as_pipeline_and_platform_spec():
    pipeline_doc, platform_doc = yaml.safe_load_all(COMPILED.read_text())
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    tasks = spec.root.dag.tasks
    rounds = load_recipe(PAPER_RECIPE).selfplay.rounds
    expected = {"configure", "prepare-data", "distill", "sft", "report"}
    assert expected <= set(tasks)
    assert sum(name.startswith("rollout") for name in tasks) == rounds
    assert sum(name.startswith("dpo") for name in tasks) == rounds
    assert "kubernetes" in platform.platforms


def test_gpu_steps_get_shm_secret_and_gpu_parameters(tmp_path):
    docs = list(yaml.safe_load_all(compile_to(tmp_path, shm_size="32Gi", registry="reg.example/ml/").read_text()))
    pipeline_doc, platform_doc = docs
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    sft = next(v for k, v in executors.items() if k == "exec-sft")
    assert sft["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "32Gi", "volumeName": "dshm"}
    ]
    assert {e["envVar"] for s in sft["secretAsEnv"] for e in s["keyToEnv"]} == {
        "MEDCRITICAL_S3_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    # The teacher's and the judge's endpoint settings come from optional Secrets, the API key never from the recipe.
    distill_secrets = executors["exec-distill"]["secretAsEnv"]
    teacher = next(s for s in distill_secrets if "MEDCRITICAL_TEACHER_API_KEY" in json.dumps(s))
    assert teacher["optional"] is True
    # The teacher-corrected arm (selfplay.corrector: teacher) calls the same teacher from the rollout step.
    assert "MEDCRITICAL_TEACHER_API_KEY" in json.dumps(executors["exec-rollout"]["secretAsEnv"])
    assert "MEDCRITICAL_JUDGE_API_KEY" in json.dumps(executors["exec-evaluate"]["secretAsEnv"])
    images = {name: e["container"]["image"] for name, e in pipeline_doc["deploymentSpec"]["executors"].items()}
    assert images["exec-sft"] == "reg.example/ml/medcritical-train-cuda:0.1.0"
    assert images["exec-rollout"] == "reg.example/ml/medcritical-infer-cuda:0.1.0"
    assert images["exec-prepare-data"] == "reg.example/ml/medcritical-cpu:0.1.0"
    # GPU count and type are pipeline parameters, not constants.
    sft_task = pipeline_doc["root"]["dag"]["tasks"]["sft"]
    assert "train_gpus" in json.dumps(pipeline_doc["root"]["inputDefinitions"])
    assert "distill" in pipeline_doc["root"]["dag"]["tasks"]
    assert sft_task["componentRef"]["name"] == "comp-sft"


def test_work_pvc_gives_every_step_a_persistent_work_folder(tmp_path):
    docs = list(yaml.safe_load_all(compile_to(tmp_path, work_pvc="medcritical-work").read_text()))
    pipeline_doc, platform_doc = docs
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-sft", "exec-rollout", "exec-dpo", "exec-distill"):
        assert executors[name]["pvcMount"][0]["mountPath"] == "/medcritical-work", name
        assert "medcritical-work" in json.dumps(executors[name]["pvcMount"]), name
        env = pipeline_doc["deploymentSpec"]["executors"][name]["container"]["env"]
        assert {"name": "MEDCRITICAL_WORKDIR", "value": "/medcritical-work"} in env, name
    # Without the option the pods keep their own disk: no claim is required to run the pipeline.
    plain = list(yaml.safe_load_all(compile_to(tmp_path).read_text()))[1]
    assert "pvcMount" not in json.dumps(plain)


def test_teacher_step_is_never_cached_unless_asked(tmp_path):
    def distill_caching(**kwargs):
        doc = next(yaml.safe_load_all(compile_to(tmp_path, **kwargs).read_text()))
        return doc["root"]["dag"]["tasks"]["distill"]["cachingOptions"]

    assert distill_caching() == {}  # enableCache absent: false
    assert distill_caching(cache_teacher=True) == {"enableCache": True}


class _ApiResponse:
    """What kfp_server_api's REST layer reads of an HTTP response."""

    def __init__(self, data):
        self.status, self.reason, self.data = 200, "OK", json.dumps(data).encode()

    def getheaders(self):
        return {"content-type": "application/json"}

    def getheader(self, name, default=None):
        return self.getheaders().get(name, default)


def _record_kfp_api(monkeypatch, run_id: str) -> list[tuple]:
    """kfp.Client's HTTP layer replaced by a recorder that answers like a KFP API server (one experiment;
    a created run gets `run_id`). Returns the calls: (method, url, query parameters, headers, body)."""
    import kfp_server_api.rest as rest

    calls = []

    def request(self, method, url, query_params=None, headers=None, body=None, **kwargs):
        calls.append((method, url, dict(query_params or []), dict(headers or {}), body))
        if url.endswith("/experiments") and method == "GET":
            return _ApiResponse({"experiments": [{"experiment_id": "exp-1", "display_name": "medcritical"}]})
        if url.endswith("/runs") and method == "POST":
            return _ApiResponse({"run_id": run_id, "display_name": body["display_name"]})
        return _ApiResponse({})

    monkeypatch.setattr(rest.RESTClientObject, "request", request)
    return calls


def test_submit_sends_the_recipe_and_parameters_through_kfp_client(tmp_path, monkeypatch):
    """kfp.Client for real, its HTTP layer replaced by a recorder that answers like a KFP API server."""
    import kfp

    calls = _record_kfp_api(monkeypatch, "run-42")
    recipe = load_recipe(PAPER_RECIPE)
    client = kfp.Client(host="http://kfp.invalid")
    result = submit_run(
        recipe,
        "http://kfp.invalid",
        experiment="medcritical",
        run_name="paper-1",
        params=["train_gpus=8", "run_root=s3://b/runs/paper"],
        client=client,
    )
    assert result.run_id == "run-42"
    method, url, _, _, body = next(c for c in calls if c[1].endswith("/runs"))
    assert method == "POST" and body["experiment_id"] == "exp-1" and body["display_name"] == "paper-1"
    params = body["runtime_config"]["parameters"]
    assert params["train_gpus"] == 8 and params["run_root"] == "s3://b/runs/paper"
    from medcritical.recipe import load_recipe_text  # the recipe travels as text and loads back the same

    assert load_recipe_text(params["recipe"]) == recipe
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "medcritical"


def test_bad_param_is_named():
    from medcritical.pipeline_runner import parse_params

    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_params(["train_gpus"])


def _docs(path):
    pipeline_doc, platform_doc = yaml.safe_load_all(Path(path).read_text())
    return pipeline_doc, platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_step_writes_under_its_own_run_id():
    """KFP's cache key is the task's inputs: with the run id in run_root, a task of a new run never matches
    an old run's (no cached SFT model beside new traces), and runs sharing run_root never overwrite each other."""
    pipeline_doc, _ = _docs(COMPILED)
    tasks = pipeline_doc["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        if name == "configure":
            continue
        run_root = task["inputs"]["parameters"]["run_root"]["runtimeValue"]["constant"]
        assert run_root == "{{$.inputs.parameters['pipelinechannel--run_root']}}/{{$.pipeline_job_uuid}}", name
    # Every later step takes its upstream output as an artifact (its metadata names the folder, under the
    # run id): the KFP UI's lineage shows which data trained which model.
    assert tasks["sft"]["inputs"]["artifacts"] == {
        "traces": {"taskOutputArtifact": {"outputArtifactKey": "traces", "producerTask": "distill"}}
    }
    assert tasks["dpo"]["inputs"]["artifacts"] == {
        "pairs": {"taskOutputArtifact": {"outputArtifactKey": "pairs", "producerTask": "rollout"}},
        "start_model": {"taskOutputArtifact": {"outputArtifactKey": "model", "producerTask": "sft"}},
    }


def test_local_runs_keep_the_recipes_folder(tmp_path):
    """`medcritical run` (no cluster settings) writes where the recipe says: no run id in its paths."""
    from kfp import compiler

    from medcritical.pipeline_runner import _pipeline

    compiler.Compiler().compile(_pipeline(load_recipe(PAPER_RECIPE), None, False), str(tmp_path / "local.yaml"))
    assert "pipeline_job_uuid" not in (tmp_path / "local.yaml").read_text()


def test_every_task_has_requests_limits_timeout_and_retries():
    pipeline_doc, executors = _docs(COMPILED)
    for name, executor in pipeline_doc["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"], name
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"], name
        assert int(executors[name]["activeDeadlineSeconds"]) > 0, name
    for name, task in pipeline_doc["root"]["dag"]["tasks"].items():
        assert task["retryPolicy"]["maxRetryCount"] == 2, name
    # GPU tasks tolerate the GPU taint without being told; memory of GPU tasks is a parameter.
    assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in executors["exec-sft"][
        "tolerations"
    ]
    assert (
        "train_memory"
        in pipeline_doc["deploymentSpec"]["executors"]["exec-sft"]["container"]["resources"]["resourceMemoryLimit"]
    )
    # The work folder is on a volume of the planned size, not the node's root disk.
    volume = executors["exec-sft"]["genericEphemeralVolume"][0]
    assert volume["mountPath"] == "/medcritical-work" and volume["size"] == "400Gi"
    env = pipeline_doc["deploymentSpec"]["executors"]["exec-sft"]["container"]["env"]
    assert {"name": "MEDCRITICAL_WORKDIR", "value": "/medcritical-work"} in env


def test_an_api_teacher_gets_no_gpu_and_no_vllm_image(tmp_path):
    pipeline_doc, executors = _docs(COMPILED)  # the paper recipe: a QwQ-32B endpoint
    distill = pipeline_doc["deploymentSpec"]["executors"]["exec-distill"]["container"]
    assert distill["image"].startswith("medcritical-cpu:") and "accelerator" not in distill["resources"]
    assert "emptyDirMounts" not in executors["exec-distill"]
    local = load_recipe(PAPER_RECIPE, ["distill.backend=vllm", "distill.teacher_model=s3://m/models/QwQ-32B"])
    local_doc, _ = _docs(compile_pipeline(local, tmp_path / "local-teacher.yaml"))
    distill = local_doc["deploymentSpec"]["executors"]["exec-distill"]["container"]
    assert distill["image"].startswith("medcritical-infer-cuda:") and "accelerator" in distill["resources"]


def test_a_pipeline_compiled_for_an_api_teacher_refuses_a_local_one():
    from medcritical.kfp_runtime import resolve_recipe_text
    from medcritical.recipe import RecipeError, dump_recipe

    text = dump_recipe(load_recipe(PAPER_RECIPE))
    with pytest.raises(RecipeError, match="compiled for an API teacher"):
        resolve_recipe_text(text, 1, ["distill.backend=vllm"], "", "", "", teacher_on_gpu=False)
    assert resolve_recipe_text(text, 1, [], "", "", "", teacher_on_gpu=False)


def test_distill_uri_reuses_an_earlier_runs_traces(tmp_path):
    from medcritical.kfp_runtime import reuse_step_output

    earlier = tmp_path / "run-1" / "distill"
    earlier.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="sft.jsonl"):
        reuse_step_output("distill", str(earlier))
    (earlier / "sft.jsonl").write_text("{}\n")
    assert reuse_step_output("distill", str(earlier)) == str(earlier)
    pipeline_doc, _ = _docs(COMPILED)
    reuse = pipeline_doc["root"]["dag"]["tasks"]["distill"]["inputs"]["parameters"]["reuse_uri"]
    assert reuse == {"componentInputParameter": "distill_uri"}


def test_submit_to_multi_user_kubeflow_sends_the_namespace_and_token(tmp_path, monkeypatch):
    """kfp.Client for real (its HTTP layer recorded): the profile namespace and the bearer token reach the API."""
    calls = _record_kfp_api(monkeypatch, "run-7")
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    result = submit_run(
        load_recipe(PAPER_RECIPE),
        "http://kfp.invalid",
        experiment="medcritical",
        run_name="r",
        params=[],
        namespace="team-alice",
        token_file=str(token),
    )
    assert result.run_id == "run-7"
    listing = next(c for c in calls if c[1].endswith("/experiments") and c[0] == "GET")
    assert listing[2].get("namespace") == "team-alice"
    assert calls and all(c[3].get("authorization") == "Bearer secret-token" for c in calls)
    with pytest.raises(FileNotFoundError, match="--token-file"):
        submit_run(
            load_recipe(PAPER_RECIPE),
            "http://kfp.invalid",
            experiment="e",
            run_name="r",
            params=[],
            token_file=str(tmp_path / "missing"),
        )


def test_a_model_of_unknown_shape_still_compiles_at_the_minimum_sizes(tmp_path):
    """The plan cannot size a model it knows nothing of; compiling must not need its config.json."""
    recipe = load_recipe(PAPER_RECIPE, ["model.base=s3://bkt/models/Mystery-3B"])
    pipeline_doc, executors = _docs(compile_pipeline(recipe, tmp_path / "p.yaml"))
    assert executors["exec-sft"]["genericEphemeralVolume"][0]["size"] == "400Gi"
    assert "train_memory" in json.dumps(pipeline_doc["root"]["inputDefinitions"])


def test_steps_exchange_typed_artifacts_for_the_lineage():
    """Data and traces are Datasets, trained models Models, evaluations Metrics, the report Markdown: the KFP
    UI then shows which data trained which model. Only the artifact types changed, no step's parameters."""
    pipeline_doc, _ = _docs(COMPILED)

    def artifacts(component: str, side: str) -> dict[str, str]:
        definitions = pipeline_doc["components"][f"comp-{component}"].get(side, {}).get("artifacts", {})
        return {name: spec["artifactType"]["schemaTitle"] for name, spec in definitions.items()}

    outputs = {c: artifacts(c, "outputDefinitions") for c in ("prepare-data", "distill", "sft", "rollout", "dpo")}
    assert outputs == {
        "prepare-data": {"data": "system.Dataset", "metrics": "system.Metrics"},
        "distill": {"traces": "system.Dataset", "metrics": "system.Metrics"},
        "sft": {"model": "system.Model", "metrics": "system.Metrics"},
        "rollout": {"pairs": "system.Dataset", "metrics": "system.Metrics"},
        "dpo": {"model": "system.Model", "metrics": "system.Metrics"},
    }
    assert artifacts("evaluate", "outputDefinitions") == {"metrics": "system.Metrics"}
    assert artifacts("report", "outputDefinitions") == {"metrics": "system.Metrics", "summary": "system.Markdown"}
    assert artifacts("evaluate", "inputDefinitions") == {"data": "system.Dataset", "model": "system.Model"}
    assert artifacts("report", "inputDefinitions") == dict.fromkeys(
        ("base_eval", "sft_eval", "dpo_eval"), "system.Metrics"
    )
    # Without a start model SFT trains the recipe's model.base, and the base evaluation evaluates it.
    tasks = pipeline_doc["root"]["dag"]["tasks"]
    assert "start_model" not in tasks["sft"]["inputs"].get("artifacts", {})
    assert set(tasks["evaluate"]["inputs"]["artifacts"]) == {"data"}  # eval-base
    assert tasks["evaluate-2"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "sft"
    # No step returns a URI string any more: the artifacts carry the folders.
    for name, component in pipeline_doc["components"].items():
        if name != "comp-configure":
            assert "parameters" not in component.get("outputDefinitions", {}), name

"""The compiled pipeline: drift from the source, strict parse, cluster settings, submission."""

import json
import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from medcritical.orchestration.recipe import load_recipe
from medcritical.platform.pipeline_runner import compile_pipeline, submit_run

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
    assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "32Gi", "volumeName": "dshm"} in sft[
        "emptyDirMounts"
    ]
    assert {e["envVar"] for s in sft["secretAsEnv"] for e in s["keyToEnv"]} == {
        "MEDCRITICAL_S3_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    # The paper recipe's API teacher reads its endpoint Secret (required: attached only because it is used);
    # its self-corrected rollout and its mcq evaluation read neither the teacher's nor the judge's.
    distill_secrets = executors["exec-distill"]["secretAsEnv"]
    teacher = next(s for s in distill_secrets if "MEDCRITICAL_TEACHER_API_KEY" in json.dumps(s))
    assert not teacher.get("optional")
    assert "TEACHER" not in json.dumps(executors["exec-rollout"]["secretAsEnv"])
    assert "JUDGE" not in json.dumps(executors["exec-evaluate"]["secretAsEnv"])
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
        params=["train_gpus=8", "train_memory=200Gi", "run_root=s3://bkt/runs/paper"],
        client=client,
    )
    assert result.run_id == "run-42"
    method, url, _, _, body = next(c for c in calls if c[1].endswith("/runs"))
    assert method == "POST" and body["experiment_id"] == "exp-1" and body["display_name"] == "paper-1"
    params = body["runtime_config"]["parameters"]
    assert params["train_gpus"] == "8" and params["run_root"] == "s3://bkt/runs/paper"
    from medcritical.orchestration.recipe import load_recipe_text  # the recipe travels as text and loads back the same

    assert load_recipe_text(params["recipe"]) == recipe
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "medcritical"


def test_bad_param_is_named():
    from medcritical.platform.pipeline_runner import parse_params

    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_params(["train_gpus"])


def _docs(path):
    pipeline_doc, platform_doc = yaml.safe_load_all(Path(path).read_text())
    return pipeline_doc, platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


PLACEHOLDER = re.compile(r"\{\{\$[^{}]*\}\}")


def _constants(node, path=""):
    """Every runtimeValue constant of a compiled pipeline, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "runtimeValue" and isinstance(value, dict) and "constant" in value:
                yield path, value["constant"]
            else:
                yield from _constants(value, f"{path}.{key}")
    elif isinstance(node, list):
        for k, value in enumerate(node):
            yield from _constants(value, f"{path}[{k}]")


def test_every_step_writes_under_its_own_run_id():
    """KFP's cache key is the task's inputs: with the run id an input, a task of a new run never matches an
    old run's (no cached SFT model beside new traces), and runs sharing run_root never overwrite each other.
    KFP's driver substitutes a placeholder only when it is a parameter's whole value: the run id is its own
    input, the path is joined in Python (kfp_runtime.task_root)."""
    pipeline_doc, _ = _docs(COMPILED)
    tasks = pipeline_doc["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        if name == "configure":
            continue
        parameters = task["inputs"]["parameters"]
        assert parameters["run_root"] == {"componentInputParameter": "run_root"}, name
        assert parameters["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}, name
    # No placeholder anywhere sits inside a longer string (the driver would pass it on literally).
    embedded = [
        (where, value)
        for where, value in _constants(pipeline_doc)
        if isinstance(value, str) and "{{$" in value and not PLACEHOLDER.fullmatch(value)
    ]
    assert embedded == []
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

    from medcritical.platform.pipeline_runner import pipeline_for

    compiler.Compiler().compile(pipeline_for(load_recipe(PAPER_RECIPE), None, False), str(tmp_path / "local.yaml"))
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
    # The work folder is a size-limited emptyDir of the planned size: writable by the images' UID 10001 (a
    # fresh generic ephemeral volume is root:root 0755 on EBS/PD/Ceph, and KFP sets no fsGroup).
    assert "genericEphemeralVolume" not in json.dumps(executors)
    work = next(m for m in executors["exec-sft"]["emptyDirMounts"] if m["volumeName"] == "work")
    assert work == {"mountPath": "/medcritical-work", "sizeLimit": "400Gi", "volumeName": "work"}
    env = pipeline_doc["deploymentSpec"]["executors"]["exec-sft"]["container"]["env"]
    assert {"name": "MEDCRITICAL_WORKDIR", "value": "/medcritical-work"} in env


def test_an_api_teacher_gets_no_gpu_and_no_vllm_image(tmp_path):
    pipeline_doc, executors = _docs(COMPILED)  # the paper recipe: a QwQ-32B endpoint
    distill = pipeline_doc["deploymentSpec"]["executors"]["exec-distill"]["container"]
    assert distill["image"].startswith("medcritical-cpu:") and "accelerator" not in distill["resources"]
    assert "/dev/shm" not in json.dumps(executors["exec-distill"]["emptyDirMounts"])  # only its work folder
    local = load_recipe(PAPER_RECIPE, ["distill.backend=vllm", "distill.teacher_model=s3://m/models/QwQ-32B"])
    # (Sizing aside: QwQ-32B with its full 40,960-token context does not fit one 80 GB GPU; the plan says so.)
    local_doc, _ = _docs(compile_pipeline(local, tmp_path / "local-teacher.yaml", check=False))
    distill = local_doc["deploymentSpec"]["executors"]["exec-distill"]["container"]
    assert distill["image"].startswith("medcritical-infer-cuda:") and "accelerator" in distill["resources"]


def test_a_pipeline_compiled_for_an_api_teacher_refuses_a_local_one():
    from medcritical.orchestration.recipe import RecipeError, dump_recipe
    from medcritical.platform.kfp_runtime import resolve_recipe_text

    text = dump_recipe(load_recipe(PAPER_RECIPE))
    with pytest.raises(RecipeError, match="compiled for an API teacher"):
        resolve_recipe_text(text, 1, ["distill.backend=vllm"], "", "", "", teacher_on_gpu=False)
    assert resolve_recipe_text(text, 1, [], "", "", "", teacher_on_gpu=False)


def test_distill_uri_reuses_an_earlier_runs_traces(tmp_path):
    from medcritical.platform.kfp_runtime import reuse_step_output

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
    from medcritical.platform.pipeline_runner import PreflightError

    with pytest.raises(PreflightError, match="--token-file"):
        submit_run(
            load_recipe(PAPER_RECIPE),
            "http://kfp.invalid",
            experiment="e",
            run_name="r",
            params=[],
            token_file=str(tmp_path / "missing"),
        )


def test_a_model_of_unknown_shape_is_refused_without_its_config(tmp_path):
    """The plan cannot size a model it knows nothing of (a 70B would get a 7B's memory): compiling asks for
    its config.json, and sizes the tasks from it when given."""
    from medcritical.platform.plan import PlanError

    recipe = load_recipe(PAPER_RECIPE, ["model.base=s3://bkt/models/Mystery-70B"])
    with pytest.raises(PlanError, match="--model-config"):
        compile_pipeline(recipe, tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()
    config = tmp_path / "config.json"  # Llama-2-70B's shape
    config.write_text(
        '{"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, '
        '"num_attention_heads": 64, "num_key_value_heads": 8}'
    )
    pipeline_doc, _ = _docs(compile_pipeline(recipe, tmp_path / "p.yaml", model_config=str(config), check=False))
    default = pipeline_doc["root"]["inputDefinitions"]["parameters"]["train_memory"]["defaultValue"]
    assert int(default.removesuffix("Gi")) > 200  # a 70B's host memory, not the 64Gi floor


def tasks_of(pipeline_doc: dict) -> dict:
    return pipeline_doc["root"]["dag"]["tasks"]


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
    # The report's distill statistics come with the traces (an earlier run's, when distill_uri reused them); every
    # round's statistics with the last round's DPO model (its rounds file).
    assert artifacts("report", "inputDefinitions") == {
        **dict.fromkeys(("base_eval", "sft_eval", "dpo_eval"), "system.Metrics"),
        "traces": "system.Dataset",
        "last_round": "system.Model",
    }
    assert tasks_of(pipeline_doc)["report"]["inputs"]["artifacts"]["traces"]["taskOutputArtifact"] == {
        "outputArtifactKey": "traces",
        "producerTask": "distill",
    }
    assert tasks_of(pipeline_doc)["report"]["inputs"]["artifacts"]["last_round"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model",
        "producerTask": "dpo",
    }
    # The first round's DPO extends no earlier round's rounds file.
    assert artifacts("dpo", "inputDefinitions") == {
        "pairs": "system.Dataset",
        "start_model": "system.Model",
        "previous_round": "system.Model",
    }
    assert "previous_round" not in tasks_of(pipeline_doc)["dpo"]["inputs"]["artifacts"]
    # Without a start model SFT trains the recipe's model.base, and the base evaluation evaluates it.
    tasks = tasks_of(pipeline_doc)
    assert "start_model" not in tasks["sft"]["inputs"].get("artifacts", {})
    assert set(tasks["evaluate"]["inputs"]["artifacts"]) == {"data"}  # eval-base
    assert tasks["evaluate-2"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "sft"
    # No step returns a URI string any more: the artifacts carry the folders.
    for name, component in pipeline_doc["components"].items():
        if name != "comp-configure":
            assert "parameters" not in component.get("outputDefinitions", {}), name


def _driver_accelerator_count(pipeline_doc: dict, task_name: str, params: dict | None = None) -> str:
    """The GPU count KFP's driver puts in a task's nvidia.com/gpu limit, read as the driver reads it
    (backend/src/v2/driver: the resolved parameter's string value; a number gives "" and no limit)."""
    task = pipeline_doc["root"]["dag"]["tasks"][task_name]
    component = pipeline_doc["components"][task["componentRef"]["name"]]
    executor = pipeline_doc["deploymentSpec"]["executors"][component["executorLabel"]]
    count = executor["container"]["resources"]["accelerator"]["resourceCount"]
    match = re.fullmatch(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", count)
    assert match, f"{task_name}: the accelerator count {count!r} is not one whole placeholder"
    pipeline_param = task["inputs"]["parameters"][match.group(1)]["componentInputParameter"]
    root = pipeline_doc["root"]["inputDefinitions"]["parameters"][pipeline_param]
    value = (params or {}).get(pipeline_param, root.get("defaultValue"))
    # The task input carries the pipeline parameter's value as it was given: a STRING parameter a string
    # value, an integer one a number value, whose GetStringValue() is "".
    return value if root["parameterType"] == "STRING" and isinstance(value, str) else ""


def test_gpu_tasks_get_a_gpu_limit_from_string_parameters(tmp_path):
    """KFP's driver reads an accelerator count as a string: an int parameter gave "" and no nvidia.com/gpu
    limit at all (pods on CPU nodes, or seeing every GPU of a node)."""
    pipeline_doc, _ = _docs(COMPILED)
    roots = pipeline_doc["root"]["inputDefinitions"]["parameters"]
    assert roots["train_gpus"]["parameterType"] == roots["infer_gpus"]["parameterType"] == "STRING"
    for task in ("sft", "dpo", "rollout", "evaluate", "evaluate-2", "evaluate-3"):
        assert _driver_accelerator_count(pipeline_doc, task) == "1", task
    assert _driver_accelerator_count(pipeline_doc, "sft", {"train_gpus": "8"}) == "8"
    # A recipe written for 8 GPUs (run.train_gpus) compiles with train_gpus 8 by default.
    eight, _ = _docs(compile_to(tmp_path, REPO / "recipes" / "full-zero3-8gpu.yaml"))
    assert _driver_accelerator_count(eight, "sft") == "8"


def test_task_root_joins_the_run_id_in_python():
    from medcritical.platform.kfp_runtime import task_root

    assert task_root("s3://bkt/runs/paper", "8f1c-42") == "s3://bkt/runs/paper/8f1c-42"
    assert task_root("runs/demo", "") == "runs/demo"  # local runs: no run id
    with pytest.raises(ValueError, match="unresolved KFP placeholder"):
        task_root("s3://bkt/runs/paper", "{{$.pipeline_job_uuid}}")


def _endpoint_secrets(executors: dict) -> dict[str, set[str]]:
    found = {}
    for name, executor in executors.items():
        for secret in executor.get("secretAsEnv") or []:
            keys = json.dumps(secret)
            for kind in ("TEACHER", "JUDGE"):
                if f"MEDCRITICAL_{kind}_API_KEY" in keys:
                    assert not secret.get("optional"), (name, "optional Secrets need KFP 2.15")
                    found.setdefault(kind, set()).add(name)
    return found


def test_endpoint_secrets_only_where_the_recipe_calls_an_endpoint(tmp_path):
    """Secrets are attached only to the tasks that read them, and then required: `optional: true` is honoured
    only from KFP 2.15.0, so on older backends an absent optional Secret left the pod waiting."""
    _, executors = _docs(COMPILED)  # API teacher, self-correction, mcq
    assert _endpoint_secrets(executors) == {"TEACHER": {"exec-distill"}}
    teacher_judge = load_recipe(PAPER_RECIPE, ["selfplay.corrector=teacher", "evaluate.protocol=judge-paper"])
    _, executors = _docs(compile_pipeline(teacher_judge, tmp_path / "tj.yaml", check=False))
    evaluations = {"exec-evaluate", "exec-evaluate-2", "exec-evaluate-3"}
    assert _endpoint_secrets(executors) == {"TEACHER": {"exec-distill", "exec-rollout"}, "JUDGE": evaluations}
    demo = load_recipe(REPO / "recipes" / "demo.yaml")  # CMExam's explanations, mcq: no endpoint at all
    _, executors = _docs(compile_pipeline(demo, tmp_path / "demo.yaml", check=False))
    assert _endpoint_secrets(executors) == {}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["train_gpu=8"], "--param train_gpu: the pipeline has no such parameter"),
        (["train_gpus=-1"], "--param train_gpus=-1: a whole number of at least 0"),
        (["infer_gpus=two"], "--param infer_gpus='two': a whole number"),
        (["train_nodes=0"], "--param train_nodes=0: a whole number of at least 1"),
        (["train_memory=lots"], "--param train_memory='lots': a Kubernetes memory quantity"),
        (["s3_secret=My_Secret"], "--param s3_secret 'My_Secret' is not a Kubernetes object name"),
        (["run_root=s3:/bucket/x"], "--param run_root='s3:/bucket/x': an s3://bucket/prefix URI"),
        (["accelerator_type=gpu"], "--param accelerator_type='gpu': an extended resource name"),
        (["tolerations={key: x}"], "--param tolerations={'key': 'x'}: a YAML list"),
    ],
)
def test_submit_refuses_parameters_kubernetes_or_kfp_would_refuse(monkeypatch, params, message):
    from medcritical.platform.pipeline_runner import PreflightError

    calls = _record_kfp_api(monkeypatch, "never")
    with pytest.raises(PreflightError) as error:
        submit_run(load_recipe(PAPER_RECIPE), "http://kfp.invalid", experiment="e", run_name="r", params=params)
    assert message in str(error.value)
    assert calls == []  # nothing reached the server


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"registry": "Registry.Example.com/ML/"}, "which no container runtime accepts"),
        ({"registry": "registry.example.com/ml"}, "a prefix ending in '/'"),
        ({"work_pvc": "Work_Claim"}, "--work-pvc 'Work_Claim' is not a Kubernetes object name"),
        ({"shm_size": "lots"}, "--shm-size 'lots': a Kubernetes quantity"),
    ],
)
def test_compile_refuses_settings_kubernetes_would_refuse(tmp_path, option, message):
    from medcritical.platform.pipeline_runner import PreflightError

    with pytest.raises(PreflightError, match=re.escape(message)):
        compile_to(tmp_path, **option)
    assert not (tmp_path / "p.yaml").exists()


def test_submit_runs_the_plan_and_refuses_a_run_that_does_not_fit(monkeypatch, capsys):
    """LoRA on 8 GPUs: eight ranks load the base in host memory; the default train_memory is too small.
    Exit 2, the fix named, nothing sent; with the named memory the run goes through."""
    from medcritical.cli import main

    calls = _record_kfp_api(monkeypatch, "run-8")
    argv = ["submit", "--host", "http://kfp.invalid", "--recipe", str(PAPER_RECIPE), "--param", "train_gpus=8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pipeline task sft" in err and "fix: --param train_memory=" in err
    assert calls == []
    memory = re.search(r"fix: --param train_memory=(\d+Gi)", err).group(1)
    assert main([*argv, "--param", f"train_memory={memory}"]) == 0, capsys.readouterr().err
    body = next(c for c in calls if c[1].endswith("/runs"))[4]
    assert body["runtime_config"]["parameters"]["train_gpus"] == "8"  # the string the pipeline declares


DIGESTS = {
    "medcritical-cpu": "sha256:" + "c" * 64,
    "medcritical-train-cuda": "sha256:" + "7" * 64,
    # A value may be the whole pushed reference (docker inspect's RepoDigests): its digest is used.
    "medcritical-infer-cuda": "reg.example/ml/medcritical-infer-cuda@sha256:" + "1" * 64,
}


def _pinned(repository: str) -> str:
    return f"reg.example/ml/{repository}:0.1.0@sha256:" + DIGESTS[repository].rsplit("sha256:", 1)[1]


def test_image_digests_pin_every_task_and_the_trainjob_image(tmp_path):
    """`--image-digests FILE` (what the build pushed): every executor and the TrainJob launcher's image run
    name:tag@sha256:..., so a tag moved after compiling changes nothing that runs."""
    digests = tmp_path / "digests.json"
    digests.write_text(json.dumps(DIGESTS))
    pipeline_doc, _ = _docs(compile_to(tmp_path, registry="reg.example/ml/", image_digests=str(digests)))
    images = {name: e["container"]["image"] for name, e in pipeline_doc["deploymentSpec"]["executors"].items()}
    assert images["exec-sft"] == images["exec-dpo"] == _pinned("medcritical-train-cuda")
    assert images["exec-rollout"] == images["exec-evaluate"] == _pinned("medcritical-infer-cuda")
    assert images["exec-configure"] == images["exec-prepare-data"] == _pinned("medcritical-cpu")
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", image) for image in images.values()), images
    for task in ("sft", "dpo"):
        launcher = tasks_of(pipeline_doc)[task]["inputs"]["parameters"]["trainjob_image"]
        assert launcher == {"runtimeValue": {"constant": _pinned("medcritical-train-cuda")}}
    # YAML is read as well (JSON is YAML); a digest given twice in the same form compiles the same.
    (tmp_path / "digests.yaml").write_text(yaml.safe_dump(DIGESTS))
    again, _ = _docs(compile_to(tmp_path, registry="reg.example/ml/", image_digests=str(tmp_path / "digests.yaml")))
    assert again["deploymentSpec"] == pipeline_doc["deploymentSpec"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"medcritical-cpu": DIGESTS["medcritical-cpu"]},
            "no digest for medcritical-infer-cuda, medcritical-train-cuda",
        ),
        ({**DIGESTS, "medcritical-gpu": "sha256:" + "0" * 64}, "medcritical-gpu: not an image of the pipeline"),
        ({**DIGESTS, "medcritical-cpu": "0.1.0"}, "medcritical-cpu: '0.1.0' is not a digest"),
        ({**DIGESTS, "medcritical-cpu": "sha256:ABC"}, "is not a digest"),
        (["sha256:" + "0" * 64], "a mapping of image name to digest"),
    ],
)
def test_an_image_digests_file_that_would_pin_only_some_images_is_refused(tmp_path, content, message):
    from medcritical.platform.pipeline_runner import PreflightError

    digests = tmp_path / "digests.json"
    digests.write_text(json.dumps(content))
    with pytest.raises(PreflightError, match=re.escape(message)):
        compile_to(tmp_path, image_digests=str(digests))
    assert not (tmp_path / "p.yaml").exists()


GPU_EXECUTORS = ("exec-sft", "exec-dpo", "exec-rollout", "exec-evaluate")


def test_gpu_product_selects_the_gpu_tasks_nodes_through_configure(tmp_path):
    """gpu_product (a string parameter, "" = any GPU) reaches KFP's driver as part of one whole nodeSelector
    parameter: configure merges it into node_selector and the GPU tasks take that output (KFP backends take a
    parameterised nodeSelector from 2.5.0, a parameterised node affinity only from 2.14.0)."""
    from medcritical.orchestration.recipe import dump_recipe
    from medcritical.pipelines.medcritical_pipeline import configure

    pipeline_doc, executors = _docs(COMPILED)
    roots = pipeline_doc["root"]["inputDefinitions"]["parameters"]
    assert roots["gpu_product"] == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}
    merged = {"taskOutputParameter": {"outputParameterKey": "gpu_node_selector", "producerTask": "configure"}}
    for name in GPU_EXECUTORS:
        assert executors[name]["nodeSelector"] == {"nodeSelectorJson": merged}, name
    assert "nodeSelector" not in executors["exec-prepare-data"] and "nodeSelector" not in executors["exec-report"]
    configure_inputs = tasks_of(pipeline_doc)["configure"]["inputs"]["parameters"]
    assert configure_inputs["gpu_product"] == {"componentInputParameter": "gpu_product"}
    assert configure_inputs["node_selector"] == {"componentInputParameter": "node_selector"}
    for task in ("sft", "dpo"):  # and the TrainJobs of a multi-node run
        parameters = tasks_of(pipeline_doc)[task]["inputs"]["parameters"]
        assert parameters["gpu_product"] == {"componentInputParameter": "gpu_product"}, task
        assert parameters["kueue_queue"] == {"componentInputParameter": "kueue_queue"}, task

    recipe = dump_recipe(load_recipe(PAPER_RECIPE))
    out = configure(recipe, 1, [], "", "", "", False, {"pool": "a100"}, "NVIDIA-A100-SXM4-80GB")
    assert out.gpu_node_selector == {"pool": "a100", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert configure(recipe, 1, [], "", "", "", False, {"pool": "a100"}, "").gpu_node_selector == {"pool": "a100"}
    assert load_recipe_text_equal(out.recipe, recipe)
    from medcritical.platform.scheduling import SchedulingError

    with pytest.raises(SchedulingError, match="gpu_product='H100, H200': one value of the node label"):
        configure(recipe, 1, [], "", "", "", False, {}, "H100, H200")
    with pytest.raises(SchedulingError, match="disagree"):
        configure(recipe, 1, [], "", "", "", False, {"nvidia.com/gpu.product": "A"}, "B")
    with pytest.raises(SchedulingError, match="kueue_queue='GPU_Queue': the name of a Kueue LocalQueue"):
        configure(recipe, 1, [], "", "", "", False, {}, "", "GPU_Queue")


def load_recipe_text_equal(a: str, b: str) -> bool:
    from medcritical.orchestration.recipe import load_recipe_text

    return load_recipe_text(a) == load_recipe_text(b)


def test_kueue_queue_labels_the_gpu_pods_when_compiled_and_is_the_trainjobs_default(tmp_path):
    """KFP's pod labels are constants of the compiled pipeline: --kueue-queue labels the GPU tasks' pods
    (kueue.x-k8s.io/queue-name) and is the default of the kueue_queue parameter the TrainJobs read; the same
    for --kueue-priority (a WorkloadPriorityClass: KFP sets no priorityClassName on a task's pod)."""
    pipeline_doc, executors = _docs(compile_to(tmp_path, kueue_queue="team-gpus", kueue_priority="training-high"))
    labels = {"kueue.x-k8s.io/queue-name": "team-gpus", "kueue.x-k8s.io/priority-class": "training-high"}
    for name in GPU_EXECUTORS:
        assert executors[name]["podMetadata"] == {"labels": labels}, name
    assert "priorityClassName" not in json.dumps(executors)  # KFP's executor config has no such field
    for name in ("exec-configure", "exec-prepare-data", "exec-report", "exec-distill"):  # distill: an API teacher
        assert "podMetadata" not in executors[name], name
    roots = pipeline_doc["root"]["inputDefinitions"]["parameters"]
    assert roots["kueue_queue"]["defaultValue"] == "team-gpus" and roots["kueue_queue"]["parameterType"] == "STRING"
    assert roots["kueue_priority"]["defaultValue"] == "training-high"
    for task in ("sft", "dpo"):
        parameters = tasks_of(pipeline_doc)[task]["inputs"]["parameters"]
        assert parameters["kueue_priority"] == {"componentInputParameter": "kueue_priority"}, task
    # Without it no pod carries the label (Kueue would hold a labelled pod until a queue admits it).
    plain, plain_executors = _docs(COMPILED)
    assert "podMetadata" not in json.dumps(plain_executors)
    assert plain["root"]["inputDefinitions"]["parameters"]["kueue_queue"]["defaultValue"] == ""
    assert plain["root"]["inputDefinitions"]["parameters"]["kueue_priority"]["defaultValue"] == ""


def test_scheduling_parameters_kubernetes_would_refuse_are_refused(tmp_path, monkeypatch):
    from medcritical.platform.pipeline_runner import PreflightError

    with pytest.raises(PreflightError, match="--kueue-queue='Team GPUs': the name of a Kueue LocalQueue"):
        compile_to(tmp_path, kueue_queue="Team GPUs")
    calls = _record_kfp_api(monkeypatch, "never")
    for param, message in (
        ("gpu_product=NVIDIA H100", "--param gpu_product='NVIDIA H100': one value of the node label"),
        ("kueue_queue=-q", "--param kueue_queue='-q': the name of a Kueue LocalQueue"),
        ("kueue_priority=High", "--param kueue_priority='High': the name of a Kueue WorkloadPriorityClass"),
    ):
        with pytest.raises(PreflightError, match=re.escape(message)):
            submit_run(load_recipe(PAPER_RECIPE), "http://kfp.invalid", experiment="e", run_name="r", params=[param])
    assert calls == []

"""`medcritical plan`: the sizing formulas, and the shipped Jobs and pipeline checked against them."""

import json
from pathlib import Path

import pytest
import yaml

from medcritical.cli import main
from medcritical.orchestration.recipe import load_recipe
from medcritical.platform import plan
from medcritical.platform.plan import node_pod_patches

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "k8s" / "jobs"
PIPELINE = REPO / "pipelines" / "medcritical.yaml"
QWEN7B = plan.KNOWN_SHAPES["Qwen2.5-7B-Instruct"]


def run_plan(capsys, *args, pipeline=PIPELINE, manifests=True):
    """The plan over the shipped Jobs and the checked-in pipeline (pipeline=None: the pipeline compiled for
    the recipe, as `medcritical submit` sends it)."""
    jobs = ["--manifests", str(JOBS)] if manifests else ["--no-manifests"]
    code = main(["plan", *args, *jobs, *(["--pipeline", str(pipeline)] if pipeline else [])])
    return code, capsys.readouterr().out


def test_parameter_count_matches_a_real_qwen2_model():
    """The formula counts what transformers builds (biases on q/k/v, untied head), here on a small Qwen2."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    shape = plan.shape_from_config(config.to_dict(), "small")
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    # The published sizes: Qwen2.5-7B-Instruct 7.61B, QwQ-32B 32.8B.
    assert round(QWEN7B.parameters / 1e9, 2) == 7.62
    assert round(plan.KNOWN_SHAPES["QwQ-32B"].parameters / 1e9, 1) == 32.8


def test_lora_parameter_count_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.shape_from_config(config.to_dict(), "small").lora_parameters(8) == trainable


def test_zero_stages_shard_what_the_zero_paper_says():
    """Full fine-tuning with mixed-precision Adam: 16 bytes per parameter on one GPU (the ZeRO paper); under
    ZeRO-3 DeepSpeed's own estimate: 18 bytes per parameter over the ranks (the fp32 gradient copy at the
    optimizer step) plus the largest layer (the 152k x 3584 embedding) gathered whole in fp32."""
    recipe = load_recipe(REPO / "recipes" / "full-zero3-8gpu.yaml")
    psi = QWEN7B.parameters
    zero3 = plan.training_need("sft", recipe, QWEN7B, gpus=8)
    model_states = zero3.parts["model states (DeepSpeed's estimate)"]
    assert model_states == int(18 * psi / 8) + 4 * QWEN7B.vocab_size * QWEN7B.hidden_size
    assert "weights" not in zero3.parts
    zero0 = plan.training_need(
        "sft", recipe.model_copy(update={"sft": recipe.sft.model_copy(update={"deepspeed": None})}), QWEN7B, gpus=8
    )
    assert zero0.parts["weights"] + zero0.parts["gradients"] + zero0.parts["optimizer"] == pytest.approx(16 * psi)
    assert zero0.gpu_memory > 80 * plan.GiB > zero3.gpu_memory


def test_dpo_full_fine_tune_pays_for_the_reference_unless_precomputed():
    recipe = load_recipe(
        REPO / "recipes" / "paper-7b-lora.yaml", ["selfplay.dpo.lora.enabled=false", "selfplay.dpo.deepspeed=zero3"]
    )
    with_reference = plan.training_need("dpo", recipe, QWEN7B, gpus=8)
    assert with_reference.parts["DPO reference"] == pytest.approx(2 * QWEN7B.parameters / 8)
    precomputed = load_recipe(
        REPO / "recipes" / "paper-7b-lora.yaml",
        [
            "selfplay.dpo.lora.enabled=false",
            "selfplay.dpo.deepspeed=zero3",
            "selfplay.dpo.trainer.precompute_ref_log_probs=true",
        ],
    )
    assert "DPO reference" not in plan.training_need("dpo", precomputed, QWEN7B, gpus=8).parts


def test_vllm_needs_weights_and_one_sequence_within_its_memory_share():
    recipe = load_recipe(REPO / "recipes" / "paper-7b-lora.yaml")
    need = plan.plan_steps(recipe)["evaluate"]
    # vLLM reserves KV cache for one sequence of its context: the recipe's generation.max_model_len.
    kv = QWEN7B.kv_bytes_per_token() * recipe.generation.max_model_len
    assert need.gpu_memory == int((2 * QWEN7B.parameters + kv + plan.PER_RANK_OVERHEAD) / 0.85)
    # Unset: the model's own context (32,768 tokens for Qwen2.5-7B), which vLLM takes by default.
    full = plan.plan_steps(
        recipe.model_copy(update={"generation": recipe.generation.model_copy(update={"max_model_len": None})})
    )
    assert full["evaluate"].gpu_memory == int(
        (2 * QWEN7B.parameters + QWEN7B.kv_bytes_per_token() * 32_768 + plan.PER_RANK_OVERHEAD) / 0.85
    )
    short = recipe.generation.model_copy(update={"max_model_len": 1024})
    with pytest.raises(plan.PlanError, match="generation.max_model_len 1024 is shorter"):
        plan.plan_steps(recipe.model_copy(update={"generation": short}))


@pytest.mark.parametrize(
    "args",
    [
        ["--recipe", "recipes/paper-7b-lora.yaml"],
        ["--recipe", "recipes/demo.yaml"],
        ["--recipe", "recipes/paper-7b-improved.yaml"],
        ["--recipe", "recipes/paper-7b-selfplay-self.yaml"],
        ["--recipe", "recipes/paper-7b-selfplay-teacher.yaml"],
        # The README's cluster command: the checked-in pipeline with train_gpus=8 and the memory it needs.
        ["--recipe", "recipes/paper-7b-lora.yaml", "--param", "train_gpus=8", "--param", "train_memory=136Gi"],
    ],
)
def test_shipped_recipes_fit_the_shipped_jobs_and_pipeline(capsys, monkeypatch, args):
    monkeypatch.chdir(REPO)
    code, out = run_plan(capsys, *args, pipeline=None if "--param" not in args else PIPELINE)
    assert code == 0, out
    assert "every checked step fits" in out
    assert "pipeline task sft" in out and "PyTorchJob/medcritical-sft-multinode" in out


def test_the_8_gpu_recipe_is_planned_on_8_gpus(capsys, monkeypatch):
    """Written for 8 GPUs (run.train_gpus: 8): the table and the pipeline compiled for it plan 8 ranks, with no
    flag. (The k8s/jobs multi-node Jobs are checked in test_k8s_manifests: their global batch now comes from
    the runner.)"""
    monkeypatch.chdir(REPO)
    code = main(["plan", "--recipe", "recipes/full-zero3-8gpu.yaml", "--no-manifests"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ZeRO-3, full, 8 rank(s)" in out and "pipeline task sft" in out


def test_the_checked_in_pipeline_names_the_memory_eight_gpus_need(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out = run_plan(capsys, "--recipe", "recipes/paper-7b-lora.yaml", "--param", "train_gpus=8")
    assert code == 2
    assert "pipeline task dpo" in out and "fix: --param train_memory=136Gi" in out


def test_a_batch_the_ranks_cannot_keep_is_refused_before_the_run(capsys, monkeypatch):
    """The runner divides the accumulation by the world size or refuses; the plan applies the same rule."""
    monkeypatch.chdir(REPO)
    code, out = run_plan(
        capsys,
        "--recipe",
        "recipes/full-zero3-8gpu.yaml",
        "--set",
        "sft.trainer.gradient_accumulation_steps=2",
        pipeline=None,
        manifests=False,
    )
    assert code == 2
    assert "global batch needs sft.trainer.gradient_accumulation_steps a multiple of the 8 ranks, has 2" in out
    assert "--set sft.trainer.gradient_accumulation_steps=8 (the runner divides it by the 8 ranks)" in out


def test_several_nodes_are_planned_as_the_trainjob_the_pipeline_creates(capsys, monkeypatch):
    """train_nodes=2 train_gpus=0 (the documented multi-node setting): the sft and dpo tasks wait on a
    TrainJob of 2 x node_gpus GPUs sized by this plan; its GPUs and global batch are what is checked."""
    monkeypatch.chdir(REPO)
    code, out = run_plan(
        capsys,
        "--recipe",
        "recipes/full-zero3-8gpu.yaml",
        "--param",
        "train_nodes=2",
        "--param",
        "node_gpus=8",
        "--param",
        "train_gpus=0",
        pipeline=None,
        manifests=False,
    )
    assert code == 0, out
    assert "pipeline task sft as a TrainJob of 2 x 8 GPUs" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "train_gpu=8"], "--param train_gpu: the pipeline has no such parameter"),
        (["--param", "train_gpus=-2"], "--param train_gpus=-2: a whole number of at least 0"),
        (["--param", "train_memory=lots"], "--param train_memory='lots': a Kubernetes memory quantity"),
        (["--param", "judge_secret=Judge!"], "--param judge_secret 'Judge!' is not a Kubernetes object name"),
        (["--gpu-memory", "lots"], "'lots' is not a Kubernetes quantity"),
        (["--train-gpus", "-1"], "--train-gpus -1: a whole number of GPUs"),
        (["--pipeline", "no-such.yaml"], "--pipeline no-such.yaml: no such file"),
    ],
)
def test_bad_plan_inputs_end_in_one_sentence_and_exit_2(capsys, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    code = main(["plan", "--recipe", "recipes/paper-7b-lora.yaml", "--no-manifests", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_quantities_parse_as_the_api_server_parses_them():
    assert plan.quantity("96Gi") == 96 * plan.GiB
    assert plan.quantity("1Pi") == 2**50 and plan.quantity("1Ei") == 2**60
    assert plan.quantity("500m") == 1  # half a byte, rounded up
    assert plan.quantity("1.5G") == 1_500_000_000
    with pytest.raises(plan.PlanError, match="not a Kubernetes quantity"):
        plan.quantity("lots")


def test_an_undersized_job_fails_naming_step_resource_need_and_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    job = yaml.safe_load((JOBS / "sft" / "job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"]["sizeLimit"] = "20Gi"
    for section in ("requests", "limits"):
        pod["containers"][0]["resources"][section]["memory"] = "24Gi"
    small = tmp_path / "small-sft.yaml"
    small.write_text(yaml.safe_dump(job))
    code = main(["plan", "--recipe", "recipes/paper-7b-lora.yaml", "--manifests", str(small), "--no-pipeline"])
    out = capsys.readouterr().out
    assert code == 2
    errors = out.split("plan: error:")[1]
    assert "Job/medcritical-sft" in errors and "(sft)" in errors
    assert "work folder volume 'tmp' needs 33Gi, has 20Gi" in errors
    assert "memory needs 51Gi (host + /dev/shm), has 24Gi" in errors
    assert "fix: resources.limits.memory and requests.memory >= 51Gi" in errors


def test_a_job_whose_work_folder_is_its_home_folder_fails(tmp_path, capsys, monkeypatch):
    """The bug this preflight was written for: the work folder on the 20Gi home emptyDir."""
    monkeypatch.chdir(REPO)
    text = (JOBS / "sft" / "job.yaml").read_text()
    small = tmp_path / "old-sft.yaml"
    small.write_text(text.replace("value: /tmp/medcritical-work", "value: /home/medcritical/.cache/medcritical/work"))
    code = main(["plan", "--recipe", "recipes/paper-7b-lora.yaml", "--manifests", str(small), "--no-pipeline"])
    assert code == 2
    assert "work folder volume 'home' needs 33Gi, has 20Gi" in capsys.readouterr().out


def test_a_model_of_unknown_shape_in_s3_asks_for_its_config(tmp_path, capsys):
    code = main(
        [
            "plan",
            "--recipe",
            str(REPO / "recipes" / "paper-7b-lora.yaml"),
            "--set",
            "model.base=s3://bkt/models/Mystery-3B",
            "--no-manifests",
            "--no-pipeline",
        ]
    )
    assert code == 2
    assert "--model-config" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(
        '{"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, '
        '"num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4}'
    )
    assert (
        main(
            [
                "plan",
                "--recipe",
                str(REPO / "recipes" / "paper-7b-lora.yaml"),
                "--set",
                "model.base=s3://bkt/models/Mystery-3B",
                "--model-config",
                str(config),
                "--no-manifests",
                "--no-pipeline",
            ]
        )
        == 0
    )


def test_an_undersized_trainjob_fails(tmp_path, capsys, monkeypatch):
    """The TrainJob's pod as the runtime builds it: trainer resources, the runtime patch's work volume."""
    monkeypatch.chdir(REPO)
    job = yaml.safe_load((JOBS / "sft-multinode" / "trainjob.yaml").read_text())
    volumes = node_pod_patches(job["spec"])[0]["volumes"]
    next(v for v in volumes if v["name"] == "tmp")["emptyDir"]["sizeLimit"] = "100Gi"
    small = tmp_path / "trainjob.yaml"
    small.write_text(yaml.safe_dump(job))
    code = main(["plan", "--recipe", "recipes/full-zero3-8gpu.yaml", "--manifests", str(small), "--no-pipeline"])
    out = capsys.readouterr().out
    assert code == 2
    assert "TrainJob/medcritical-sft-multinode" in out and "work folder volume 'tmp' needs 359Gi, has 100Gi" in out


def test_times_come_only_from_benchmarks_of_the_same_recipe(capsys, monkeypatch, tmp_path):
    """Times are borrowed only from a benchmark of this very recipe (a result written here as
    benchmarks/pipeline_e2e.py writes it), never from one of another recipe or an older schema."""
    from medcritical.orchestration.recipe import dump_recipe

    monkeypatch.chdir(REPO)
    demo_recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    result = {
        "status": "ok",
        "machine": {"cpu": "test", "cpu_cores": 2},
        "started_at": "now",
        "raw": {
            "recipe": dump_recipe(demo_recipe),
            "kfp_total_s": 123.0,
            "kfp_tasks": [{"step": "sft", "s": 45.0}, {"step": "round1-rollout", "s": 20.0}],
        },
    }
    (tmp_path / "pipeline_e2e.json").write_text(json.dumps(result))
    monkeypatch.setattr(plan.measured, "benchmark_results_dir", lambda: tmp_path)
    assert main(["plan", "--recipe", "recipes/demo.yaml", "--no-manifests", "--no-pipeline"]) == 0
    demo = capsys.readouterr().out
    measured = plan.measured_seconds(demo_recipe)
    assert measured and measured[0]["sft"] == 45.0 and measured[0]["rollout"] == 20.0
    assert "time: measured for this recipe (pipeline_e2e.json" in demo and "123 s" in demo
    # Another recipe (one key changed) gets no borrowed figure, nor does a result of an older recipe schema.
    assert (
        plan.measured_seconds(load_recipe(REPO / "recipes" / "demo.yaml", ["sft.trainer.num_train_epochs=1"])) is None
    )
    result["raw"]["recipe"] = "sft: {optim: {epochs: 1}}"
    (tmp_path / "pipeline_e2e.json").write_text(json.dumps(result))
    assert plan.measured_seconds(demo_recipe) is None
    assert main(["plan", "--recipe", "recipes/paper-7b-lora.yaml", "--no-manifests", "--no-pipeline"]) == 0
    assert "time: no estimate" in capsys.readouterr().out


def test_a_local_teacher_needs_a_pipeline_compiled_for_it(tmp_path, capsys, monkeypatch):
    """The shipped pipeline gives the distill task no GPU (an API teacher); a recipe with the teacher in
    the pod fails against it, naming the recompile, and fits a pipeline compiled for it with its GPUs."""
    from medcritical.platform.pipeline_runner import compile_pipeline

    monkeypatch.chdir(REPO)
    recipe = "k8s/components/step-config/recipe.yaml"  # distill.backend vllm, QwQ-32B on 2 GPUs
    assert main(["plan", "--recipe", recipe, "--no-manifests", "--pipeline", str(PIPELINE)]) == 2
    out = capsys.readouterr().out
    assert "pipeline task distill" in out and "GPUs needs 2, has none; fix: recompile the pipeline" in out
    compiled = compile_pipeline(load_recipe(REPO / recipe), tmp_path / "p.yaml")  # infer_gpus defaults to 2
    assert main(["plan", "--recipe", recipe, "--no-manifests", "--pipeline", str(compiled)]) == 0
    capsys.readouterr()
    assert main(["plan", "--recipe", recipe, "--no-manifests", "--pipeline", str(compiled), "--param", "infer_gpus=1"])
    assert "fix: --param infer_gpus=2" in capsys.readouterr().out

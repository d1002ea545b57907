"""`medcritical plan`: the sizing formulas, and the shipped Jobs and pipeline checked against them."""

import json
from pathlib import Path

import pytest
import yaml

from medcritical import plan
from medcritical.cli import main
from medcritical.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "k8s" / "jobs"
PIPELINE = REPO / "pipelines" / "medcritical.yaml"
QWEN7B = plan.KNOWN_SHAPES["Qwen2.5-7B-Instruct"]


def run_plan(capsys, *args):
    code = main(["plan", *args, "--manifests", str(JOBS), "--pipeline", str(PIPELINE)])
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
    """Full fine-tuning with mixed-precision Adam: 16 bytes per parameter on one GPU, 16/N under ZeRO-3."""
    recipe = load_recipe(REPO / "recipes" / "full-zero3-8gpu.yaml")
    psi = QWEN7B.parameters
    zero3 = plan.training_need("sft", recipe, QWEN7B, gpus=8)
    model_states = zero3.parts["weights"] + zero3.parts["gradients"] + zero3.parts["optimizer"]
    assert model_states == pytest.approx(16 * psi / 8, rel=1e-6)
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
    kv = QWEN7B.kv_bytes_per_token() * (plan.PROMPT_TOKENS + recipe.generation.max_new_tokens)
    assert need.gpu_memory == int((2 * QWEN7B.parameters + kv + plan.PER_RANK_OVERHEAD) / 0.85)


@pytest.mark.parametrize(
    "args",
    [
        ["--recipe", "recipes/paper-7b-lora.yaml"],
        ["--recipe", "recipes/demo.yaml"],
        # Eight ranks each load the base for LoRA DPO: the plan names the memory parameter to pass; the pipeline
        # divides the accumulation by the GPUs, so the recipe gives its batch as on one GPU (16 = 1 x 16).
        [
            "--recipe",
            "recipes/full-zero3-8gpu.yaml",
            "--train-gpus",
            "8",
            "--param",
            "train_memory=136Gi",
            "--set",
            "sft.trainer.gradient_accumulation_steps=16",
        ],
    ],
)
def test_shipped_recipes_fit_the_shipped_jobs_and_pipeline(capsys, monkeypatch, args):
    monkeypatch.chdir(REPO)
    code, out = run_plan(capsys, *args)
    assert code == 0, out
    assert "every checked step fits" in out
    assert "pipeline task sft" in out and "PyTorchJob/medcritical-sft-multinode" in out


def test_the_8_gpu_recipe_names_the_memory_it_needs_on_the_pipeline(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out = run_plan(capsys, "--recipe", "recipes/full-zero3-8gpu.yaml", "--train-gpus", "8")
    assert code == 2
    assert "pipeline task dpo" in out and "--param train_memory=" in out
    # Its accumulation (2) is written for 8 torchrun processes; the pipeline's task would refuse it.
    assert "--set sft.trainer.gradient_accumulation_steps=16 (the step divides it by the 8 GPUs)" in out


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
    assert "work folder volume 'tmp' needs 34Gi, has 20Gi" in errors
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
    assert "work folder volume 'home' needs 34Gi, has 20Gi" in capsys.readouterr().out


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
    """The TrainJob's pod as the runtime builds it: trainer resources, the override's work volume."""
    monkeypatch.chdir(REPO)
    job = yaml.safe_load((JOBS / "sft-multinode" / "trainjob.yaml").read_text())
    volumes = job["spec"]["podTemplateOverrides"][0]["spec"]["volumes"]
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
    from medcritical.recipe import dump_recipe

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
    monkeypatch.setattr(plan, "BENCHMARK_RESULTS", tmp_path)
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
    from medcritical.pipeline_runner import compile_pipeline

    monkeypatch.chdir(REPO)
    recipe = "k8s/components/step-config/recipe.yaml"  # distill.backend vllm, QwQ-32B on 2 GPUs
    assert main(["plan", "--recipe", recipe, "--no-manifests", "--pipeline", str(PIPELINE)]) == 2
    out = capsys.readouterr().out
    assert "pipeline task distill" in out and "GPUs needs 2, has none; fix: recompile the pipeline" in out
    compiled = compile_pipeline(load_recipe(REPO / recipe), tmp_path / "p.yaml")
    assert main(["plan", "--recipe", recipe, "--no-manifests", "--pipeline", str(compiled)]) == 2
    assert "fix: --param infer_gpus=2" in capsys.readouterr().out
    assert (
        main(["plan", "--recipe", recipe, "--no-manifests", "--pipeline", str(compiled), "--param", "infer_gpus=2"])
        == 0
    ), capsys.readouterr().out

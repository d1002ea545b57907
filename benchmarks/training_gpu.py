"""Training speed and memory on GPU: SFT (LoRA; full fine-tuning with ZeRO-3; packing on and off) and DPO (with
and without precomputed reference log-probs), the project's trainers against TRL's defaults, in one run.

    python -m benchmarks.training_gpu                          # every case, 7B-shaped random models (GPU)
    python -m benchmarks.training_gpu --cases sft-lora sft-lora-trl-defaults   # a subset (each case ~2-4 min)
    python -m benchmarks.training_gpu --gpus 8                 # every case under torchrun on 8 GPUs
    python -m benchmarks.training_gpu --tiny                   # CPU smoke mode: tiny model, a few steps
    python -m benchmarks.training_gpu --work-dir /data/bench   # keeps models and finished cases: a rerun resumes

Ours: `medcritical.training.sft.train_sft` / `training.dpo.train_dpo` with a recipe section per case.
Baseline: TRL's SFTTrainer / DPOTrainer with their default configs (SFTConfig() / DPOConfig()), given only what
any run must (output dir, steps, batch size, max_length, the same LoRA or DeepSpeed file, no saving).
Both see the same model folder and the same rows (the pipeline's SFT data from CMExam explanations).

Models: random-initialised, shaped like Qwen2.5-7B (benchmarks/models.py), no download. LoRA cases use all 28
layers; full fine-tuning keeps as many layers as fit 16 bytes/parameter in half the GPU memory (all 28 from
about 8 x 80 GB) and says how many. tokens/s is measured after `--warmup` steps (compilation, allocator growth,
reference precomputation excluded) from TRL's logged `num_tokens` (non-padding tokens, all ranks).
MFU = 6 x parameters x tokens/s per GPU / the GPU's dense bf16 peak (named in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import add_table, finish, gpu_benchmark_can_run, gpu_spec, new_result, run_case, summary_row

TITLE = "3. Training on GPU: SFT and DPO tokens/s, MFU and peak memory, ours against TRL defaults"


@dataclass(frozen=True)
class Case:
    kind: str  # sft | dpo
    impl: str  # ours | trl
    lora: bool
    packing: bool = False
    deepspeed: str | None = None
    precompute: bool = False


CASES = {
    "sft-lora": Case("sft", "ours", lora=True),
    "sft-lora-packing": Case("sft", "ours", lora=True, packing=True),
    "sft-lora-trl-defaults": Case("sft", "trl", lora=True),
    "sft-full-zero3": Case("sft", "ours", lora=False, deepspeed="zero3"),
    "sft-full-zero3-packing": Case("sft", "ours", lora=False, packing=True, deepspeed="zero3"),
    "sft-full-zero3-trl-defaults": Case("sft", "trl", lora=False, deepspeed="zero3"),
    "dpo-lora": Case("dpo", "ours", lora=True),
    "dpo-lora-precomputed": Case("dpo", "ours", lora=True, precompute=True),
    "dpo-lora-trl-defaults": Case("dpo", "trl", lora=True),
    "dpo-full": Case("dpo", "ours", lora=False),
    "dpo-full-precomputed": Case("dpo", "ours", lora=False, precompute=True),
}
# (ours, baseline, what is compared) for the key table.
COMPARISONS = [
    ("sft-lora", "sft-lora-trl-defaults", "SFT LoRA r=8, packing off"),
    ("sft-lora-packing", "sft-lora-trl-defaults", "SFT LoRA r=8, packing on"),
    ("sft-full-zero3", "sft-full-zero3-trl-defaults", "SFT full, ZeRO-3, packing off"),
    ("sft-full-zero3-packing", "sft-full-zero3-trl-defaults", "SFT full, ZeRO-3, packing on"),
    ("dpo-lora", "dpo-lora-trl-defaults", "DPO LoRA"),
    ("dpo-lora-precomputed", "dpo-lora", "DPO LoRA, precomputed reference"),
    ("dpo-full-precomputed", "dpo-full", "DPO full, precomputed reference"),
]


# -- one case, in its own process ----------------------------------------------------------------------------


def steady_throughput_callback(warmup: int):
    from transformers import TrainerCallback

    class SteadyThroughput(TrainerCallback):
        """(step, time, cumulative tokens) at every log; tokens/s between the first log at or after `warmup`
        steps and the last one."""

        def __init__(self):
            self.marks: list[tuple[int, float, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.marks.append((state.global_step, time.perf_counter(), float(logs["num_tokens"])))

        def tokens_per_second(self) -> float | None:
            after = [m for m in self.marks if m[0] >= warmup]
            if len(after) < 2:
                return None
            (_, t0, n0), (_, t1, n1) = after[0], after[-1]
            return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    return SteadyThroughput()


def _trainer(args, case: Case) -> dict:
    """TRL arguments of a benchmark case (the sections' `trainer:` mapping)."""
    return dict(
        learning_rate=1e-5,
        warmup_steps=0.0,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        activation_checkpointing=args.gradient_checkpointing == "on",
        save_steps=10**6,
        logging_steps=1,
    )


def _lora(case: Case):
    from medcritical.training.config import LoraSection

    # merge=False: merging and saving a 15 GB model is not training speed (it is in wall_s only as the adapter save).
    return LoraSection(enabled=case.lora, merge=False)


def _trl_defaults(config_class, args, case: Case, output_dir: Path, device: str):
    """TRL's own defaults; only what every run must set, plus CPU switches in tiny mode."""
    from medcritical.training.common import deepspeed_config_path

    ds = deepspeed_config_path(case.deepspeed)
    on_cpu = device == "cpu"
    return config_class(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        deepspeed=str(ds) if ds else None,
        **({"use_cpu": True, "bf16": False} if on_cpu else {}),
    )


def run_one_case(name: str, args) -> dict:
    import torch

    from medcritical.training.common import deepspeed_config_path, distributed_group, lora_config, training_device
    from medcritical.training.metrics import peak_memory

    case = CASES[name]
    if args.tiny:
        torch.set_num_threads(1)  # a smoke run on shared cores: one thread is enough and disturbs the least
    device = training_device("cpu" if args.tiny else "cuda")
    model_dir = Path(args.lora_model if case.lora else args.full_model)
    output_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.scratch))
    timer = steady_throughput_callback(args.warmup)
    started = time.perf_counter()
    try:
        if case.impl == "ours" and case.kind == "sft":
            from medcritical.training.config import SFTSection
            from medcritical.training.sft import train_sft

            config = SFTSection(
                lora=_lora(case),
                deepspeed=case.deepspeed,
                trainer=_trainer(args, case) | {"packing": case.packing},
                resume=False,
            )
            train_sft(config, args.sft_data, model_dir, output_dir, device=device, callbacks=[timer])
        elif case.impl == "ours":
            from medcritical.training.config import DPOSection
            from medcritical.training.dpo import train_dpo

            config = DPOSection(
                lora=_lora(case),
                deepspeed=case.deepspeed,
                trainer=_trainer(args, case) | {"precompute_ref_log_probs": case.precompute},
                resume=False,
            )
            train_dpo(config, args.dpo_data, None, model_dir, output_dir, device=device, callbacks=[timer])
        else:
            from datasets import Dataset
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

            # What a launcher script does for ZeRO-3.
            with distributed_group(device, deepspeed_config_path(case.deepspeed)):
                rows = [
                    json.loads(line)
                    for line in Path(args.sft_data if case.kind == "sft" else args.dpo_data).read_text().splitlines()
                ]
                trainer_class, config_class = (SFTTrainer, SFTConfig) if case.kind == "sft" else (DPOTrainer, DPOConfig)
                config = _trl_defaults(config_class, args, case, output_dir, device)
                dtype = torch.bfloat16 if device == "cuda" else torch.float32
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
                data = [{"messages": r["messages"]} for r in rows] if case.kind == "sft" else rows
                trainer = trainer_class(
                    model=model,
                    args=config,
                    train_dataset=Dataset.from_list(data),
                    processing_class=AutoTokenizer.from_pretrained(model_dir),
                    peft_config=lora_config(_lora(case)),  # the training steps' own LoRA mapping
                    callbacks=[timer],
                )
                trainer.train()
        status = "ok"
        error = None
    except torch.cuda.OutOfMemoryError as exc:
        status, error = "out of memory", str(exc).splitlines()[0]
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tps = timer.tokens_per_second()
    memory = peak_memory()
    result = {
        "case": name,
        **asdict(case),
        "status": status,
        "error": error,
        "world_size": world,
        "model_dir": str(model_dir),
        "tokens_per_second": round(tps, 1) if tps else None,
        "tokens_per_second_per_gpu": round(tps / world, 1) if tps else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "logged_steps": len(timer.marks),
        "peak_memory_gib": memory["peak_memory_gib"],
        "peak_memory_of": memory["peak_memory_of"],
    }
    if device == "cuda":
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


# -- the driver -------------------------------------------------------------------------------------------------


def _case_args(args, name: str, paths: dict) -> list[str]:
    forwarded = [
        "--case",
        name,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--gradient-checkpointing",
        args.gradient_checkpointing,
        "--lora-model",
        str(paths["lora_model"]),
        "--full-model",
        str(paths["full_model"]),
        "--sft-data",
        str(paths["sft_data"]),
        "--dpo-data",
        str(paths["dpo_data"]),
        "--scratch",
        str(paths["scratch"]),
    ]
    return forwarded + (["--tiny"] if args.tiny else [])


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode on the tiny model")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, help="optimizer steps per case (default 20; tiny 4)")
    parser.add_argument("--warmup", type=int, help="steps left out of tokens/s (default 5; tiny 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="per-device batch (ours and TRL alike)")
    parser.add_argument(
        "--max-length", type=int, help="tokens per sequence (default 2048, the paper's cutoff; tiny 512)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="ours (TRL's default is on; a 7B at 2048 tokens needs it)",
    )
    parser.add_argument(
        "--gpus", type=int, help="GPUs per case (default: all visible); >1 runs each case under torchrun"
    )
    parser.add_argument(
        "--full-layers", type=int, help="decoder layers of the full fine-tuning model (default: what fits)"
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU, when the GPU is not in the table")
    parser.add_argument(
        "--work-dir",
        help="where models, data and finished cases are kept, so a rerun skips them "
        "(default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--not-run-reason",
        default="no GPU machine was lent to this task",
        help="recorded in the JSON when there is no GPU",
    )
    parser.add_argument("--output", help="JSON path (default benchmarks/results/training_gpu[-tiny].json)")
    # Set by the driver for each case process:
    for hidden in ("--case", "--case-output", "--lora-model", "--full-model", "--sft-data", "--dpo-data", "--scratch"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.max_length = args.max_length or (512 if args.tiny else 2048)

    if args.case:
        result = run_one_case(args.case, args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.case_output).write_text(json.dumps(result, indent=2))
        return None

    planned = [
        f"{what}: tokens/s per GPU, MFU and peak memory, {ours} against {base}" for ours, base, what in COMPARISONS
    ]
    if not gpu_benchmark_can_run(args.tiny, "training_gpu", TITLE, args.not_run_reason, planned, args.output):
        return None
    return drive(args)


def drive(args) -> Path:
    import torch

    from benchmarks.models import build_7b_shaped_model, dpo_pairs, full_layers_that_fit, parameter_count, sft_dataset
    from medcritical.modeling import resolve_model

    name = "training_gpu-tiny" if args.tiny else "training_gpu"
    result = new_result(name, TITLE + (" — tiny CPU smoke mode" if args.tiny else ""), module="training_gpu")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    gpus = 1 if args.tiny else (args.gpus or torch.cuda.device_count())
    sft_data = sft_dataset(work / "data", questions=400)
    paths = {"sft_data": sft_data, "dpo_data": dpo_pairs(sft_data, work / "data" / "pairs.jsonl"), "scratch": work}
    if args.tiny:
        paths["lora_model"] = paths["full_model"] = resolve_model("tiny")
        full_layers, peak, peak_what = None, None, "no GPU: MFU not computed"
    else:
        memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        full_layers = args.full_layers or full_layers_that_fit(memory_gib, gpus)
        print(f"building 7B-shaped models in {work} (28 layers; {full_layers} for full fine-tuning)", flush=True)
        paths["lora_model"] = build_7b_shaped_model(work / "qwen2.5-7b-shaped")
        paths["full_model"] = build_7b_shaped_model(work / f"qwen2.5-7b-shaped-{full_layers}l", layers=full_layers)
        torch.cuda.empty_cache()
        spec = gpu_spec(torch.cuda.get_device_name(0))
        peak = args.peak_tflops * 1e12 if args.peak_tflops else (spec[0] if spec else None)
        peak_what = (
            f"--peak-tflops {args.peak_tflops}"
            if args.peak_tflops
            else spec[2]
            if spec
            else "unknown GPU: pass --peak-tflops"
        )
    params = {"lora": parameter_count(paths["lora_model"]), "full": parameter_count(paths["full_model"])}
    launcher = (
        None
        if gpus == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    )
    cases = {}
    for case_name in args.cases:
        case_result = run_case(
            "training_gpu",
            _case_args(args, case_name, paths),
            launcher=launcher,
            done_file=work / "cases.jsonl" if args.work_dir else None,
        )
        n = params["lora" if CASES[case_name].lora else "full"]
        tps = case_result.get("tokens_per_second_per_gpu")
        case_result["parameters"] = n
        case_result["mfu"] = round(6 * n * tps / peak, 4) if (tps and peak) else None
        cases[case_name] = case_result
        print(
            f"{case_name}: {case_result.get('status')}, {tps} tokens/s per GPU, MFU {case_result['mfu']}, "
            f"peak {case_result.get('peak_memory_gib')} GiB",
            flush=True,
        )
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    add_table(
        result,
        "Every case (tokens/s after warm-up; peak memory: GPU allocated, or process RSS on CPU)",
        ["case", "trainer", "model", "status", "tokens/s per GPU", "MFU", "peak memory GiB", "wall s"],
        [
            [
                n,
                c.get("impl"),
                _model_label(c, full_layers, args.tiny),
                c.get("status"),
                c.get("tokens_per_second_per_gpu"),
                _pct(c.get("mfu")),
                c.get("peak_memory_gib"),
                c.get("wall_s"),
            ]
            for n, c in cases.items()
        ],
    )
    for ours, base, what in COMPARISONS:
        if ours in cases and base in cases:
            o, b = cases[ours], cases[base]
            result["summary"].append(
                summary_row(
                    "training" + (" (tiny, CPU)" if args.tiny else ""),
                    f"{what}: tokens/s per GPU",
                    o.get("tokens_per_second_per_gpu"),
                    b.get("tokens_per_second_per_gpu"),
                    "tok/s",
                    ours_label=ours,
                    baseline_label=base,
                    note=f"peak memory {o.get('peak_memory_gib')} vs {b.get('peak_memory_gib')} GiB; MFU {_pct(o.get('mfu'))} vs {_pct(b.get('mfu'))}",
                )
            )
    result["notes"] += [
        f"MFU = 6 x parameters x tokens/s per GPU / peak, with peak = {peak_what}. Parameters: {params['lora']:,} "
        f"(LoRA cases), {params['full']:,} (full fine-tuning). 6N counts a full forward and backward; for LoRA the "
        "frozen weights get no weight gradients (about 4N of real work) and attention FLOPs are left out, so LoRA MFU "
        "reads low by about a third.",
        f"{gpus} GPU(s) per case; batch {args.batch_size} per device, max_length {args.max_length}, "
        f"{args.steps} steps of which {args.warmup} warm-up; gradient checkpointing {args.gradient_checkpointing} for "
        "ours (TRL's default is on). LoRA adapters are saved unmerged (no 15 GB merge in the timing).",
        "Data: the pipeline's SFT rows built by the `explanations` distillation backend from the bundled CMExam questions "
        "(short, a few hundred tokens each): with packing on, each max_length sequence holds several rows instead of "
        "one padded row; DPO pairs pair each row's trace (chosen) with the next row's (rejected).",
    ]
    if full_layers:
        result["notes"].append(
            f"Full fine-tuning used a 7B-shaped model with {full_layers} of 28 layers (what fits "
            "16 bytes per parameter in half the memory of the GPUs); LoRA used all 28."
        )
    result["raw"] = {
        "cases": cases,
        "parameters": params,
        "gpus": gpus,
        "peak_flops": peak,
        "peak_source": peak_what,
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "case_output")},
    }
    return finish(result, args.output or Path(__file__).parent / "results" / f"{name}.json")


def _model_label(case: dict, full_layers, tiny: bool) -> str:
    if tiny:
        return "tiny"
    return "7B-shaped, 28 layers" if case.get("lora") else f"7B-shaped, {full_layers} layers"


def _pct(value) -> str | None:
    return f"{100 * value:.1f}%" if value is not None else None


if __name__ == "__main__":
    main()

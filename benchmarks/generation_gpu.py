"""Generation speed on GPU: vLLM against transformers `generate` for a 7B-shaped model, through the project's own
rollout and evaluation code, at the same prompts, samples and lengths; and batch-1 decode against the roofline.

    python -m benchmarks.generation_gpu                     # both backends, Qwen2.5-7B-shaped random model (~10 min)
    python -m benchmarks.generation_gpu --backends transformers
    python -m benchmarks.generation_gpu --eval-measured 6811   # the whole CMExam-sized evaluation, not a sample
    python -m benchmarks.generation_gpu --tiny              # CPU smoke mode: tiny model, transformers only, seconds

Per backend, in its own process (vLLM takes most of the GPU memory):
- rollout: `selfplay.rollout.rollout_questions` (the rollout step's code) over `--rollout-questions` bundled CMExam
  questions x `--samples` samples, sampling at temperature 0.8 up to `--max-new-tokens`; output tokens/s.
- evaluation: `evaluation.evaluate.evaluate_model` (the evaluate step's code: greedy, graded, written to JSONL) over
  `--eval-measured` questions, wall time scaled linearly to `--eval-questions` (6,811: CMExam's test set).
- decode: one prompt, greedy, `--decode-tokens` new tokens (batch 1: the memory-bound case) against the roofline
  bandwidth / bytes per token, bytes per token = bf16 weights + the KV cache read at the mean context.

transformers: `TransformersGenerator` (batched `model.generate`, left padding), `--batch-size` prompts per call.
vLLM: `VLLMGenerator` with max_num_seqs = batch-size x samples, so both backends hold the same sequences at once.
The model has random weights: it almost never emits EOS, so every answer is `--max-new-tokens` long (a trained
model stops earlier; per-token rates carry over, wall times are for answers of that length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_table, finish, gpu_benchmark_can_run, gpu_spec, new_result, run_case, summary_row

TITLE = "4. Generation on GPU: vLLM against transformers generate (rollout, CMExam-sized evaluation, decode roofline)"
BACKENDS = ("vllm", "transformers")
# What a GPU run measures (listed as "not run" rows when there is no GPU).
PLANNED = [
    "rollout output tokens/s, 7B-shaped model: vLLM against transformers generate (same batch and lengths)",
    "CMExam-sized evaluation (6,811 questions) wall time: vLLM against transformers generate",
    "batch-1 decode tokens/s against the roofline (memory bandwidth / bytes per token), each backend",
]


def cmexam_sized(questions: list, count: int) -> list:
    """`count` questions cycled from the bundled ones, each with its own id (evaluation resumes by id)."""
    return [
        dataclasses.replace(questions[i % len(questions)], id=f"{questions[i % len(questions)].id}#{i}")
        for i in range(count)
    ]


def load_backend(backend: str, model_dir: Path, args):
    from medcritical.modeling.generation import TransformersGenerator, VLLMGenerator

    if backend == "transformers":
        device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
        return TransformersGenerator(model_dir, device=device, dtype=dtype, batch_size=args.batch_size)
    from medcritical.orchestration.recipe import GenerationSection

    # max_num_seqs matches transformers' batch (prompts x samples), so both hold the same sequences at once.
    config = GenerationSection(backend="vllm", gpu_memory_utilization=args.gpu_memory_utilization)
    return VLLMGenerator(model_dir, config, dtype="bfloat16", max_num_seqs=args.batch_size * args.samples, seed=0)


def run_one_case(backend: str, args) -> dict:
    from medcritical.data.bundled import bundled_questions
    from medcritical.evaluation.config import EvaluateSection
    from medcritical.evaluation.evaluate import evaluate_model
    from medcritical.modeling.config import GenerationSection
    from medcritical.prompts import mcq_messages
    from medcritical.selfplay.config import RolloutSection
    from medcritical.selfplay.rollout import rollout_questions

    if backend == "vllm" and args.tiny:
        return {"backend": backend, "status": "not run", "reason": "vLLM needs a CUDA GPU (the tiny mode is CPU only)"}
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            return {"backend": backend, "status": "not run", "reason": "vLLM is not installed (pip install vllm)"}
    if args.tiny:
        import torch

        torch.set_num_threads(1)  # a smoke run on shared cores: one thread is enough and disturbs the least

    pool = bundled_questions()
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-gen-{backend}-", dir=args.scratch))
    case: dict = {"backend": backend, "status": "ok"}
    try:
        started = time.perf_counter()
        generator = load_backend(backend, Path(args.model_dir), args)
        case["load_s"] = round(time.perf_counter() - started, 1)

        # Warm-up: CUDA graphs / kernels / allocator, not part of any figure.
        generator.generate([mcq_messages(pool[0])], n=1, max_new_tokens=8, desc="warm-up")

        config = RolloutSection(
            samples_per_question=args.samples,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.rollout_questions,
        )
        t0 = time.perf_counter()
        records = rollout_questions(generator, pool[: args.rollout_questions], config, scratch / "rollouts.jsonl")
        seconds = time.perf_counter() - t0
        tokens = sum(r["num_tokens"] for r in records)
        case["rollout"] = {
            "samples": len(records),
            "output_tokens": tokens,
            "s": round(seconds, 2),
            "output_tokens_per_s": round(tokens / seconds, 1),
        }

        questions = cmexam_sized(pool, args.eval_measured)
        generation = GenerationSection(backend=backend, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        t0 = time.perf_counter()
        report = evaluate_model(
            EvaluateSection(), generation, questions, args.model_dir, scratch / "eval", generator=generator
        )
        seconds = time.perf_counter() - t0
        case["eval"] = {
            "questions": len(questions),
            "s": round(seconds, 2),
            "s_for_eval_questions": round(seconds * args.eval_questions / len(questions), 1),
            "accuracy": report.get("accuracy"),
        }

        prompt = [mcq_messages(pool[1])]
        t0 = time.perf_counter()
        [[completion]] = generator.generate(
            prompt, n=1, temperature=0.0, max_new_tokens=args.decode_tokens, desc="decode, batch 1"
        )
        seconds = time.perf_counter() - t0
        tokenizer = generator.tokenizer if backend == "transformers" else generator.llm.get_tokenizer()
        prompt_tokens = len(
            tokenizer.apply_chat_template(prompt[0], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        case["decode"] = {
            "prompt_tokens": prompt_tokens,
            "new_tokens": completion.num_tokens,
            "s": round(seconds, 3),
            "tokens_per_s": round(completion.num_tokens / seconds, 1),
        }
        case["peak_gpu_memory_gib"] = _peak_gpu_gib()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return case


def _peak_gpu_gib() -> float | None:
    """Peak memory of the GPU as the driver sees it (vLLM allocates outside torch's counters)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round(max((total - free), torch.cuda.max_memory_reserved()) / 2**30, 2)


# -- the roofline --------------------------------------------------------------------------------------------------


def kv_cache_bytes_per_token(config, value_bytes: int = 2) -> int:
    """K and V of every layer for one token of context (Qwen2.5-7B in bf16: 57,344 bytes)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * value_bytes


def bytes_per_decoded_token(model_dir: Path, parameters: int, context_tokens: float, weight_bytes: int = 2) -> float:
    """Bytes a batch-1 decode step must read: every weight once plus the K and V cache of the context so far."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return parameters * weight_bytes + kv_cache_bytes_per_token(config, weight_bytes) * context_tokens


# -- the driver ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generation_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode on the tiny model (transformers only)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the 7B-shaped model (28: all)")
    parser.add_argument("--rollout-questions", type=int, help="questions in the rollout (default 128; tiny 4)")
    parser.add_argument("--samples", type=int, default=4, help="samples per question in the rollout (the paper's k)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="tokens per answer, rollout and evaluation (default 512; tiny 16)"
    )
    parser.add_argument("--batch-size", type=int, help="prompts per generate call (default 64; tiny 4)")
    parser.add_argument(
        "--eval-questions", type=int, default=6811, help="evaluation size reported (CMExam test: 6,811)"
    )
    parser.add_argument(
        "--eval-measured", type=int, help="questions actually run (default 256; tiny 8), scaled to --eval-questions"
    )
    parser.add_argument("--decode-tokens", type=int, help="new tokens in the batch-1 decode (default 256; tiny 16)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM's share of GPU memory")
    parser.add_argument(
        "--bandwidth-tbs", type=float, help="GPU memory bandwidth in TB/s, when the GPU is not in the table"
    )
    parser.add_argument(
        "--work-dir",
        help="where the model and finished cases are kept, so a rerun skips them "
        "(default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--not-run-reason",
        default="no GPU machine was lent to this task",
        help="recorded in the JSON when there is no GPU",
    )
    parser.add_argument("--output", help="JSON path (default benchmarks/results/generation_gpu[-tiny].json)")
    for hidden in ("--case", "--case-output", "--model-dir", "--scratch"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {
        "rollout_questions": (128, 4),
        "max_new_tokens": (512, 16),
        "batch_size": (64, 4),
        "eval_measured": (256, 8),
        "decode_tokens": (256, 16),
    }
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.eval_measured = min(args.eval_measured, args.eval_questions)

    if args.case:
        Path(args.case_output).write_text(json.dumps(run_one_case(args.case, args), indent=2))
        return None

    if not gpu_benchmark_can_run(args.tiny, "generation_gpu", TITLE, args.not_run_reason, PLANNED, args.output):
        return None
    return drive(args)


def drive(args) -> Path:
    import torch

    from benchmarks.models import build_7b_shaped_model, parameter_count
    from medcritical.modeling import resolve_model

    name = "generation_gpu-tiny" if args.tiny else "generation_gpu"
    result = new_result(name, TITLE + (" — tiny CPU smoke mode" if args.tiny else ""), module="generation_gpu")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-generation-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model_dir, bandwidth, bandwidth_what = Path(resolve_model("tiny")), None, "no GPU: roofline not computed"
    else:
        print(f"building a Qwen2.5-7B-shaped model ({args.layers} layers) in {work}", flush=True)
        model_dir = build_7b_shaped_model(work / f"qwen2.5-7b-shaped-{args.layers}l", layers=args.layers)
        torch.cuda.empty_cache()
        spec = gpu_spec(torch.cuda.get_device_name(0))
        bandwidth = args.bandwidth_tbs * 1e12 if args.bandwidth_tbs else (spec[1] if spec else None)
        bandwidth_what = (
            f"--bandwidth-tbs {args.bandwidth_tbs}"
            if args.bandwidth_tbs
            else spec[2]
            if spec
            else "unknown GPU: pass --bandwidth-tbs"
        )
    parameters = parameter_count(model_dir)
    forwarded = ["--model-dir", str(model_dir), "--scratch", str(work)]
    for key in (
        "rollout_questions",
        "samples",
        "max_new_tokens",
        "batch_size",
        "eval_questions",
        "eval_measured",
        "decode_tokens",
        "gpu_memory_utilization",
    ):
        forwarded += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    forwarded += ["--tiny"] if args.tiny else []

    cases = {}
    for backend in args.backends:
        cases[backend] = run_case(
            "generation_gpu", ["--case", backend, *forwarded], done_file=work / "cases.jsonl" if args.work_dir else None
        )
        print(f"{backend}: {cases[backend].get('status')}", flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for backend, c in cases.items():
        decode = c.get("decode", {})
        roofline = None
        if decode and bandwidth:
            context = decode["prompt_tokens"] + decode["new_tokens"] / 2
            roofline = bandwidth / bytes_per_decoded_token(model_dir, parameters, context)
            decode["roofline_tokens_per_s"] = round(roofline, 1)
            decode["share_of_roofline"] = round(decode["tokens_per_s"] / roofline, 3)
        rows.append(
            [
                backend,
                c.get("status"),
                c.get("load_s"),
                c.get("rollout", {}).get("output_tokens_per_s"),
                c.get("eval", {}).get("s"),
                c.get("eval", {}).get("s_for_eval_questions"),
                decode.get("tokens_per_s"),
                roofline,
                c.get("peak_gpu_memory_gib"),
                c.get("reason", ""),
            ]
        )
    add_table(
        result,
        "Per backend (same model, prompts, samples and lengths)",
        [
            "backend",
            "status",
            "load s",
            "rollout output tok/s",
            f"eval s ({args.eval_measured} q)",
            f"eval s, {args.eval_questions:,} q (scaled)",
            "decode tok/s (batch 1)",
            "roofline tok/s (batch 1)",
            "peak GPU GiB",
            "note",
        ],
        rows,
    )

    ours, base = cases.get("vllm", {}), cases.get("transformers", {})
    step = "generation" + (" (tiny, CPU)" if args.tiny else "")
    result["summary"] += [
        summary_row(
            step,
            f"rollout output tokens/s ({args.samples} samples, {args.max_new_tokens} tokens)",
            ours.get("rollout", {}).get("output_tokens_per_s"),
            base.get("rollout", {}).get("output_tokens_per_s"),
            "tok/s",
            ours_label="vLLM",
            baseline_label="transformers generate",
            note=ours.get("reason", ""),
        ),
        summary_row(
            step,
            f"evaluation wall, {args.eval_questions:,} questions (scaled from {args.eval_measured})",
            ours.get("eval", {}).get("s_for_eval_questions"),
            base.get("eval", {}).get("s_for_eval_questions"),
            "s",
            ours_label="vLLM",
            baseline_label="transformers generate",
            higher_is_better=False,
            note=ours.get("reason", ""),
        ),
    ]
    for backend, c in cases.items():
        decode = c.get("decode", {})
        if decode.get("roofline_tokens_per_s"):
            result["summary"].append(
                summary_row(
                    step,
                    f"batch-1 decode, {backend}",
                    decode["tokens_per_s"],
                    decode["roofline_tokens_per_s"],
                    "tok/s",
                    ours_label="measured",
                    baseline_label="roofline",
                    note="ratio = share of the roofline reached",
                )
            )
    result["notes"] += [
        f"Model: {'the tiny model' if args.tiny else f'Qwen2.5-7B-shaped, {args.layers} layers, random bf16 weights'} "
        f"({parameters:,} parameters); rollout {args.rollout_questions} questions x {args.samples} samples, "
        f"evaluation {args.eval_measured} questions (scaled linearly to {args.eval_questions:,}), "
        f"{args.max_new_tokens} new tokens each; {args.batch_size} prompts per transformers call, vLLM "
        f"max_num_seqs {args.batch_size * args.samples}.",
        f"Roofline (batch 1) = memory bandwidth / bytes per token, bytes per token = 2 x parameters (bf16 weights) + "
        f"the K/V cache of the mean context; bandwidth: {bandwidth_what}.",
        "Random weights almost never emit EOS: every answer runs to the token limit, so the wall times are for "
        "answers of exactly that length; a trained model stops earlier.",
        f"Peak GPU memory is what the driver reports in use at the end of the case: vLLM reserves "
        f"{args.gpu_memory_utilization:.0%} of the GPU up front (weights + KV cache pool), transformers grows as needed.",
    ]
    result["raw"] = {
        "cases": cases,
        "parameters": parameters,
        "bandwidth": bandwidth,
        "bandwidth_source": bandwidth_what,
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "case_output")},
    }
    return finish(result, args.output or Path(__file__).parent / "results" / f"{name}.json")


if __name__ == "__main__":
    main()

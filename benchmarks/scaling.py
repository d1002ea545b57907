"""Rollout scaling on CPU: wall time against questions x samples per question, fitted as a per-sample cost.

    python -m benchmarks.scaling                     # 32/64/128 questions x 1/2/4/8 samples, 64 new tokens (~6 min, 2 cores)
    python -m benchmarks.scaling --questions 2 --samples 1 2 --max-new-tokens 4     # seconds: the smoke test

Ours: the rollout step's own code, `selfplay.rollout.rollout_questions` over `TransformersGenerator` (prompts
batched and sorted by length, k samples per prompt in one `generate` call, graded, appended to JSONL).
Baseline: the plain loop a script would write: `model.generate` once per question per sample, graded the same.
Both use the same model object in memory; its load is timed once, apart. Fit: wall = fixed + per_sample x Q x k.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import MemorySampler, add_table, finish, new_result, summary_row

TITLE = "5. Rollout scaling (CPU, tiny model): wall time against questions x samples"


def plain_rollout(model, tokenizer, questions, samples: int, max_new_tokens: int, seed: int = 0) -> int:
    """The unbatched baseline: one `generate` per question per sample. Returns the tokens generated."""
    import torch

    from medcritical.grader import grade_answer
    from medcritical.prompts import mcq_messages

    generated = 0
    for question in questions:
        inputs = tokenizer.apply_chat_template(
            mcq_messages(question), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        for sample in range(samples):
            torch.manual_seed(seed + sample)
            with torch.no_grad():
                output = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    top_k=None,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = output[0, inputs["input_ids"].shape[1] :]
            generated += len(new)
            grade_answer(tokenizer.decode(new, skip_special_tokens=True), question.answer, question.options)
    return generated


def fit_linear(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares y = fixed + slope * x, with R^2; None when fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    fixed = mean_y - slope * mean_x
    ss_res = sum((y - fixed - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys) or 1e-12
    return {"fixed_s": round(fixed, 4), "per_sample_s": round(slope, 5), "r2": round(1 - ss_res / ss_tot, 4)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="'tiny' (offline tiny model) or a local model folder")
    parser.add_argument("--questions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8], help="samples per question (k)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (ours)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 shared cores: 1 is steadiest)")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/scaling.json)")
    args = parser.parse_args(argv)

    import torch

    from medcritical.data.bundled import bundled_questions
    from medcritical.modeling import resolve_model
    from medcritical.modeling.generation import TransformersGenerator
    from medcritical.selfplay.config import RolloutSection
    from medcritical.selfplay.rollout import rollout_questions

    torch.set_num_threads(args.threads)
    result = new_result("scaling", TITLE)
    pool = bundled_questions()
    if max(args.questions) > len(pool):
        parser.error(f"--questions {max(args.questions)}: only {len(pool)} bundled questions")

    started = time.perf_counter()
    generator = TransformersGenerator(
        resolve_model(args.model), device="cpu", dtype="float32", batch_size=args.batch_size
    )
    load_s = time.perf_counter() - started

    cells = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp, MemorySampler() as memory:
        for n_questions in args.questions:
            for k in args.samples:
                questions = pool[:n_questions]
                config = RolloutSection(
                    samples_per_question=k,
                    temperature=0.8,
                    top_p=0.95,
                    max_new_tokens=args.max_new_tokens,
                    chunk_size=256,
                )
                t0 = time.perf_counter()
                records = rollout_questions(generator, questions, config, Path(tmp) / f"r-{n_questions}-{k}.jsonl")
                t1 = time.perf_counter()
                base_tokens = plain_rollout(generator.model, generator.tokenizer, questions, k, args.max_new_tokens)
                t2 = time.perf_counter()
                cell = {
                    "questions": n_questions,
                    "samples_per_question": k,
                    "samples": n_questions * k,
                    "ours_s": round(t1 - t0, 3),
                    "ours_tokens": sum(r["num_tokens"] for r in records),
                    "ours_peak_rss_gib": memory.peak_gib(t0, t1),
                    "baseline_s": round(t2 - t1, 3),
                    "baseline_tokens": base_tokens,
                    "baseline_peak_rss_gib": memory.peak_gib(t1, t2),
                }
                cells.append(cell)
                print(
                    f"{n_questions:>4} questions x {k} samples: ours {cell['ours_s']:.2f} s, "
                    f"baseline {cell['baseline_s']:.2f} s",
                    flush=True,
                )

    xs = [c["samples"] for c in cells]
    ours_fit = fit_linear(xs, [c["ours_s"] for c in cells])
    base_fit = fit_linear(xs, [c["baseline_s"] for c in cells])
    largest = max(cells, key=lambda c: c["samples"])
    result["raw"] = {
        "cells": cells,
        "fit_ours": ours_fit,
        "fit_baseline": base_fit,
        "model_load_s": round(load_s, 2),
        "settings": vars(args),
    }

    add_table(
        result,
        "Wall time per grid cell (same model in memory; load excluded)",
        [
            "questions",
            "samples/question",
            "samples",
            "ours s",
            "baseline s",
            "speedup",
            "ours tokens/s",
            "baseline tokens/s",
            "ours peak RSS GiB",
            "baseline peak RSS GiB",
        ],
        [
            [
                c["questions"],
                c["samples_per_question"],
                c["samples"],
                c["ours_s"],
                c["baseline_s"],
                f"{c['baseline_s'] / c['ours_s']:.2f}x",
                c["ours_tokens"] / c["ours_s"],
                c["baseline_tokens"] / c["baseline_s"],
                c["ours_peak_rss_gib"],
                c["baseline_peak_rss_gib"],
            ]
            for c in cells
        ],
    )
    if ours_fit and base_fit:
        add_table(
            result,
            "Fitted cost: wall = fixed + per_sample x questions x samples",
            ["path", "fixed s", "per-sample s", "R^2"],
            [
                ["ours (rollout_questions, batched)", ours_fit["fixed_s"], ours_fit["per_sample_s"], ours_fit["r2"]],
                ["baseline (one generate per sample)", base_fit["fixed_s"], base_fit["per_sample_s"], base_fit["r2"]],
            ],
        )
        result["summary"].append(
            summary_row(
                "rollout scaling (CPU, tiny)",
                f"fitted cost per sample, {args.max_new_tokens} new tokens",
                ours_fit["per_sample_s"],
                base_fit["per_sample_s"],
                "s",
                ours_label="rollout_questions",
                baseline_label="one generate per sample",
                higher_is_better=False,
            )
        )
        example = ours_fit["fixed_s"] + ours_fit["per_sample_s"] * 1000 * 4
        result["findings"] += [
            f"Sizing rule on this machine: a rollout of Q questions x k samples of {args.max_new_tokens} new tokens "
            f"takes about {ours_fit['fixed_s']:.2f} + {ours_fit['per_sample_s']:.4f} x Q x k seconds with the "
            f"project's path (R^2 {ours_fit['r2']:.3f}), against {base_fit['per_sample_s']:.4f} s per sample "
            f"unbatched (R^2 {base_fit['r2']:.3f}); e.g. 1,000 questions x 4 samples: {example / 60:.1f} min.",
            f"Per generated token that is {ours_fit['per_sample_s'] / args.max_new_tokens * 1000:.2f} ms batched against "
            f"{base_fit['per_sample_s'] / args.max_new_tokens * 1000:.2f} ms unbatched; wall time scales with "
            "Q x k x tokens per sample, so scale the slope by the tokens your samples take.",
        ]
    result["summary"].append(
        summary_row(
            "rollout scaling (CPU, tiny)",
            f"wall, {largest['questions']} questions x {largest['samples_per_question']} samples",
            largest["ours_s"],
            largest["baseline_s"],
            "s",
            ours_label="rollout_questions",
            baseline_label="one generate per sample",
            higher_is_better=False,
        )
    )
    result["notes"] += [
        f"Model {args.model}, float32 on CPU, {args.threads} torch thread(s), batch {args.batch_size} prompts, "
        f"sampling at temperature 0.8 up to {args.max_new_tokens} new tokens; model load {load_s:.1f} s, not in the cells.",
        f"Mean tokens per sample: ours {sum(c['ours_tokens'] for c in cells) / sum(xs):.1f}, baseline "
        f"{sum(c['baseline_tokens'] for c in cells) / sum(xs):.1f} (limit {args.max_new_tokens})"
        + (
            ": the untrained tiny model rarely stops early, so a sample costs max_new_tokens tokens."
            if args.model == "tiny"
            else "."
        ),
        "For a 7B model on GPUs take the per-token rate from benchmark 4 (generation_gpu) and this linear form.",
    ]
    return finish(result, args.output)


if __name__ == "__main__":
    main()

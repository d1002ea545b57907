"""R rounds of self-play: rollout → self-correction → pairs → DPO, each from the previous round's model.

Layout under `output_dir`:
    round_1/rollout/   rollouts, corrections, pairs (see selfplay.step)
    round_1/dpo/       checkpoints, model/, dpo_metrics.json (see training.dpo)
    round_1/eval/      CMExam report of the model that round 1 starts from (with eval questions)
    ...
    final_eval/        CMExam report of the final model
    selfplay_stats.json, selfplay.png   per-round statistics

Each step resumes on its own, so rerunning the command picks up where it stopped. A round that makes
no training pair ends the loop: the model cannot improve on its own answers any further.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from medcritical.data.cmexam import Question
from medcritical.recipe import Recipe

log = logging.getLogger(__name__)

STATS, PLOT = "selfplay_stats.json", "selfplay.png"


def _generate(
    recipe: Recipe, questions, eval_questions, model_path, round_dir: Path | None, eval_dir: Path | None, seed: int
):
    """Everything one model generates in a round: its CMExam evaluation and the rollout, sharing one load."""
    from medcritical.modeling.generation import load_generator

    generator = load_generator(model_path, recipe.generation, device=recipe.run.device, dtype=recipe.model.dtype)
    result = {}
    if eval_questions and eval_dir is not None:
        from medcritical.evaluation.evaluate import evaluate_model

        report = evaluate_model(
            recipe.evaluate,
            recipe.generation,
            eval_questions,
            model_path,
            eval_dir,
            device=recipe.run.device,
            dtype=recipe.model.dtype,
            label=eval_dir.parent.name,
            generator=generator,
        )
        result["eval"] = {k: report[k] for k in ("protocol", "accuracy", "correct", "n") if k in report}
    if round_dir is not None:
        from medcritical.selfplay.step import run_rollout

        result["rollout"] = run_rollout(
            recipe.selfplay,
            recipe.generation,
            questions,
            model_path,
            round_dir,
            device=recipe.run.device,
            dtype=recipe.model.dtype,
            seed=seed,
            generator=generator,
            distill=recipe.distill,
        )
    return result


def _generate_and_free(recipe: Recipe, *args):
    """Run `_generate`, then give its memory back before DPO trains on the same device. vLLM keeps GPU
    memory until its process ends, so with vLLM the generation runs in a child process."""
    if recipe.generation.backend == "vllm":
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(_generate, recipe, *args).result()
    result = _generate(recipe, *args)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return result


def run_selfplay(
    recipe: Recipe,
    questions: Sequence[Question],
    model_path: str | Path,
    output_dir: str | Path,
    *,
    eval_questions: Sequence[Question] | None = None,
) -> dict:
    """Run `recipe.selfplay.rounds` rounds from `model_path`; returns (and writes) per-round statistics.

    With `eval_questions`, every round's starting model and the final model are scored on CMExam
    (`recipe.evaluate`, through the evaluation step's `evaluate_model`).
    """
    from medcritical.training.dpo import train_dpo

    output_dir = Path(output_dir)
    # Every round uses run.seed, as the pipeline's and the single-step commands do: the same recipe gives
    # the same samples whichever way it runs (rounds still differ: each starts from a new model).
    config, seed = recipe.selfplay, recipe.run.seed
    model = str(model_path)
    rounds: list[dict] = []
    stopped = None
    for number in range(1, config.rounds + 1):
        round_dir = output_dir / f"round_{number}"
        log.info("self-play round %d/%d from %s", number, config.rounds, model)
        generated = _generate_and_free(
            recipe, questions, eval_questions, model, round_dir / "rollout", round_dir / "eval", seed
        )
        rollout = generated["rollout"]
        row = {
            "round": number,
            "model_in": model,
            "pass@1": rollout["rollout"]["pass@1"],
            "pass@k": rollout["rollout"]["pass@k"],
            "correction_rate": rollout["correction"]["correction_rate"],
            "corrected": rollout["correction"]["corrected"],
            "expected_by_guessing": rollout["correction"].get("expected_by_guessing"),
            "cost_per_pair": rollout["cost"]["per_pair"],
            "pairs": rollout["pairs"]["pairs"],
            "train_pairs": rollout["pairs"]["train_pairs"],
            "heldout_pairs": rollout["pairs"]["heldout_pairs"],
        }
        if "eval" in generated:
            row["eval_accuracy_in"] = generated["eval"]["accuracy"]
        heldout = round_dir / "rollout" / "pairs_heldout.jsonl"
        metrics = train_dpo(
            config.dpo,
            round_dir / "rollout" / "pairs.jsonl",
            heldout if rollout["pairs"]["heldout_pairs"] else None,
            model,
            round_dir / "dpo",
            device=recipe.run.device,
            dtype=recipe.model.dtype,
            seed=seed,
        )
        row["dpo"] = metrics.get("status")
        if "heldout" in metrics:
            row["heldout_reward_accuracy"] = metrics["heldout"].get("reward_accuracy")
            row["heldout_margin"] = metrics["heldout"].get("margin")
        if metrics.get("heldout_after_first_epoch"):
            row["heldout_reward_accuracy_first_epoch"] = metrics["heldout_after_first_epoch"]["reward_accuracy"]
        rounds.append(row)
        _write_summary(output_dir, rounds, model, stopped)
        if metrics.get("status") == "skipped":
            stopped = f"round {number}: {metrics['reason']}"
            log.warning("self-play stops after round %d: %s", number, metrics["reason"])
            break
        model = metrics["model"]
    final = {}
    if eval_questions:
        final = _generate_and_free(recipe, questions, eval_questions, model, None, output_dir / "final_eval", seed)
    summary = _write_summary(output_dir, rounds, model, stopped, final.get("eval"))
    return summary


def _write_summary(
    output_dir: Path, rounds: list[dict], final_model: str, stopped: str | None, final_eval: dict | None = None
) -> dict:
    summary = {"rounds": rounds, "final_model": final_model, "stopped": stopped, "final_eval": final_eval}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATS).write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    _plot(summary, output_dir / PLOT)
    return summary


def _plot(summary: dict, path: Path) -> None:
    """Left: accuracies of the model after n rounds (0 = the starting model); right: pairs and held-out margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = summary["rounds"]
    if not rounds:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [r["round"] - 1 for r in rounds]  # round r rolls out (and is scored on) the model after r-1 rounds
    left.plot(done, [r["pass@1"] for r in rounds], "o-", label="rollout pass@1 (training questions)")
    left.plot(done, [r["pass@k"] for r in rounds], "o-", label="rollout pass@k (training questions)")
    points = [(r["round"] - 1, r["eval_accuracy_in"]) for r in rounds if "eval_accuracy_in" in r]
    if summary.get("final_eval"):
        points.append((len(rounds) - (1 if summary.get("stopped") else 0), summary["final_eval"]["accuracy"]))
    if points:
        left.plot(*zip(*points), "s-", label="CMExam accuracy (eval questions)")
    left.set_xlabel("self-play rounds applied (0 = starting model)")
    left.set_ylabel("share correct")
    left.set_ylim(0, 1)
    left.legend()
    left.set_title("accuracy by round")
    x = [r["round"] for r in rounds]
    right.bar(x, [r["train_pairs"] for r in rounds], color="tab:blue", alpha=0.6, label="train pairs")
    right.set_xlabel("round")
    right.set_ylabel("DPO training pairs")
    right.legend(loc="upper left")
    margins = [(r["round"], r["heldout_margin"]) for r in rounds if r.get("heldout_margin") is not None]
    if margins:
        twin = right.twinx()
        twin.plot(*zip(*margins), "o-", color="tab:red", label="held-out reward margin")
        twin.axhline(0, color="gray", linestyle=":", linewidth=1)
        twin.set_ylabel("held-out reward margin after DPO")
        twin.legend(loc="upper right")
    right.set_title("pairs and DPO held-out margin")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""R rounds of self-play in one process: the runner called R times, as the pipeline does.

Each round runs the rollout stage (rollout → self-correction → pairs) and the DPO stage, from the
previous round's model, into the pipeline's folders under the output (a folder or an s3:// URI; every
name comes from `staging`):
    round1-eval/       CMExam report of the model that round 1 starts from (with evaluation questions)
    round1-rollout/    rollouts, corrections, pairs (selfplay/run.py)
    round1-dpo/        model/, dpo_metrics.json, train_pass.json (training/dpo.py), rounds.json (every
                       round's statistics so far: the report reads the last round's)
    ...
    eval-dpo-round<R>/ CMExam report of the final model (R: the last round that ran)
    selfplay_stats.json, selfplay.png   per-round statistics

Each stage resumes on its own, so rerunning the command picks up where it stopped. A round that makes
no training pair ends the loop: the model cannot improve on its own answers any further.
"""

from __future__ import annotations

import gc
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from matplotlib.ticker import MaxNLocator

from medcritical import storage
from medcritical.analysis.plotting import figure
from medcritical.core.stage import Stage
from medcritical.evaluation.stage import EVALUATE
from medcritical.orchestration.recipe import Recipe
from medcritical.orchestration.runner import run_stage
from medcritical.orchestration.staging import (
    final_eval_folder,
    final_model_label,
    join_uri,
    local_output_path,
    stage_uri,
)
from medcritical.selfplay.stage import DPO, ROLLOUT

log = logging.getLogger(__name__)

STATS, PLOT = "selfplay_stats.json", "selfplay.png"


def _generating(recipe: Recipe, stage: Stage, output_uri: str, **given) -> dict:
    """Run a stage that generates, then give its memory back before DPO trains on the same device. vLLM
    keeps GPU memory until its process ends, so with vLLM the stage runs in a child process."""
    if recipe.generation.backend == "vllm":
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(run_stage, stage, recipe, output_uri, **given).result()
    result = run_stage(stage, recipe, output_uri, **given)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def run_selfplay(
    recipe: Recipe, data_uri: str, model_uri: str, output_uri: str, *, eval_uri: str | None = None
) -> dict:
    """Run `recipe.selfplay.rounds` rounds from the model at `model_uri` on the training questions at
    `data_uri` (a question file or a prepare-data folder); returns (and writes) per-round statistics.

    With `eval_uri` (evaluation questions), every round's starting model and the final model are scored
    on CMExam (`recipe.evaluate`) by the evaluation stage. `output_uri` is a folder or an s3:// URI.
    """
    root = str(output_uri)  # a URI, never through Path: Path("s3://b/x") is the folder s3:/b/x
    # Every round uses run.seed, as the pipeline's and the single-step commands do: the same recipe gives
    # the same samples whichever way it runs (rounds still differ: each starts from a new model).
    model = model_uri
    rounds: list[dict] = []
    stopped = None
    for number in range(1, recipe.selfplay.rounds + 1):
        log.info("self-play round %d/%d from %s", number, recipe.selfplay.rounds, model or recipe.model.base)
        row = {"round": number, "model_in": model or recipe.model.base}
        if eval_uri:
            report = _generating(
                recipe, EVALUATE, stage_uri(root, EVALUATE, number), data=eval_uri, model=model, label=f"round {number}"
            )
            row["eval_accuracy_in"] = report["accuracy"]
        rollout_uri = stage_uri(root, ROLLOUT, number)
        rollout = _generating(recipe, ROLLOUT, rollout_uri, data=data_uri, model=model)
        row |= {
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
        dpo_uri = stage_uri(root, DPO, number)
        # previous_rounds: the previous round's DPO folder, whose rounds file this round's extends (none in round 1).
        previous = stage_uri(root, DPO, number - 1) if number > 1 else None
        metrics = run_stage(
            DPO, recipe, dpo_uri, rollout=rollout_uri, model=model, data=data_uri, previous_rounds=previous
        )
        row["dpo"] = metrics.get("status")
        if "heldout" in metrics:
            row["heldout_reward_accuracy"] = metrics["heldout"].get("reward_accuracy")
            row["heldout_margin"] = metrics["heldout"].get("margin")
        if metrics.get("heldout_after_first_epoch"):
            row["heldout_reward_accuracy_first_epoch"] = metrics["heldout_after_first_epoch"]["reward_accuracy"]
        if (train_pass := metrics.get("train_pass") or {}).get("pass@1_after") is not None:
            row["train_pass@1_after"] = train_pass["pass@1_after"]
        elif train_pass:
            row["train_pass"] = train_pass.get("reason")  # why it was not measured
        rounds.append(row)
        _write_summary(root, rounds, model, stopped)
        if metrics.get("status") == "skipped":
            stopped = f"round {number}: {metrics['reason']}"
            log.warning("self-play stops after round %d: %s", number, metrics["reason"])
            break
        model = dpo_uri  # the round's folder: its model/, or the model it kept (runner.MODEL_POINTER)
    final = None
    if eval_uri:
        # Named after the last round that ran, also after an early stop (as the pipeline and `arms` do).
        last_round = len(rounds)
        report = _generating(
            recipe,
            EVALUATE,
            join_uri(root, final_eval_folder(last_round)),
            data=eval_uri,
            model=model,
            label=final_model_label(last_round),
        )
        final = {k: report[k] for k in ("protocol", "accuracy", "correct", "n") if k in report}
    return _write_summary(root, rounds, model or recipe.model.base, stopped, final)


def _write_summary(
    root: str, rounds: list[dict], final_model: str, stopped: str | None, final_eval: dict | None = None
) -> dict:
    """Write the statistics and their plot into the run root: the folder itself, or a scratch folder whose
    two files are then published under the s3:// root."""
    summary = {"rounds": rounds, "final_model": final_model, "stopped": stopped, "final_eval": final_eval}
    folder = local_output_path(root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATS).write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    _plot(summary, folder / PLOT)
    if storage.is_s3(root):
        for name in (STATS, PLOT):
            if (folder / name).is_file():
                storage.publish(folder / name, join_uri(root, name))
    return summary


def _plot(summary: dict, path: Path) -> None:
    """Left: accuracies of the model after n rounds (0 = the starting model); right: pairs and held-out margin."""
    rounds = summary["rounds"]
    if not rounds:
        return
    with figure(path, ncols=2, size=(11, 4)) as (_, (left, right)):
        _draw(summary, rounds, left, right)


def _draw(summary: dict, rounds: list[dict], left, right) -> None:
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

"""`medcritical rollout`, `pairs`, `dpo` and `selfplay`: stage 2 of the method, one step or R rounds."""

from __future__ import annotations

import argparse
import json

from medcritical.cli.common import (
    add_recipe_arguments,
    add_restart_argument,
    questions_uri,
    recipe_from_args,
    training_questions_uri,
)
from medcritical.errors import InputError

ROLLOUT_HELP = """\
The model answers each training question k times (selfplay.rollout.*), every answer graded against
gold; each wrong answer gets up to M self-correction attempts (selfplay.correction.*); verified
corrections (or correct samples) become DPO preference pairs (selfplay.pairs.*).

Writes to --output: rollouts.jsonl, corrections.jsonl (both resume: rerun the same command after a
crash), pairs.jsonl, pairs_heldout.jsonl, rollout_stats.json (pass@1, pass@k, all-wrong/all-right).

GPU: --set generation.backend=vllm --set generation.tensor_parallel_size=N (vLLM needs a large
/dev/shm in containers; see docs/selfplay.md)."""

# The folders are the pipeline's (staging.stage_folder, final_eval_folder); tests/test_rounds_layout.py
# checks that this list is what a run writes.
SELFPLAY_HELP = """\
Run selfplay.rounds rounds, each from the previous round's model (round 1: --model). A round without
training pairs ends the loop. Rerun the same command to resume.

Writes into --output (a folder or s3:// URI):
  round<r>-eval/        CMExam report of the model round r starts from (with --eval-questions)
  round<r>-rollout/     rollouts, corrections and pairs of round r (as `medcritical rollout`)
  round<r>-dpo/         the model after round r and its DPO metrics (as `medcritical dpo`)
  eval-dpo-round<R>/    CMExam report of the final model, R the last round that ran (with --eval-questions)
  selfplay_stats.json   per-round statistics, the final model and why the loop stopped
  selfplay.png          accuracy, pairs and held-out margin by round"""


def add_parser(subparsers) -> None:
    _add_rollout(subparsers)
    _add_pairs(subparsers)
    _add_dpo(subparsers)
    _add_selfplay(subparsers)
    _add_arms(subparsers)


def _add_rollout(subparsers) -> None:
    """`medcritical rollout`: one self-play rollout step (rollout, correction, pairs)."""
    rollout = subparsers.add_parser(
        "rollout",
        help="self-play rollout + self-correction + preference pairs",
        description=ROLLOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_arguments(rollout)
    _questions_argument(rollout)
    rollout.add_argument("--model", metavar="PATH", help="model folder or 'tiny'; default: the recipe's model.base")
    rollout.add_argument(
        "--output", required=True, metavar="DIR", help="folder (or s3:// URI) for rollouts, corrections and pairs"
    )
    add_restart_argument(rollout)
    rollout.set_defaults(func=_rollout)


def _add_pairs(subparsers) -> None:
    """`medcritical pairs`: the pairs rebuilt from an earlier rollout."""
    pairs = subparsers.add_parser(
        "pairs",
        help="rebuild preference pairs from an earlier rollout (no model needed)",
        description="Rebuild pairs.jsonl / pairs_heldout.jsonl from a rollout folder's rollouts.jsonl and "
        "corrections.jsonl with the recipe's selfplay.pairs settings (e.g. another length-ratio filter).",
    )
    add_recipe_arguments(pairs)
    _questions_argument(pairs)
    pairs.add_argument("--rollout", required=True, metavar="DIR", help="output folder of `medcritical rollout`")
    pairs.add_argument("--output", required=True, metavar="DIR", help="folder for the pairs")
    pairs.set_defaults(func=_pairs)


def _add_dpo(subparsers) -> None:
    """`medcritical dpo`: DPO on a rollout's pairs."""
    dpo = subparsers.add_parser(
        "dpo",
        help="DPO on preference pairs (TRL), LoRA or full, held-out margin and early stopping",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
DPO from the given model on pairs.jsonl (selfplay.dpo.*: lora, deepspeed, trainer (trl.DPOConfig: beta, loss_type, ...), ...).
Held-out pairs (default: pairs_heldout.jsonl beside --pairs) give reward accuracy and margin, and
early stopping when the margin stops improving. Resumes from its last checkpoint in --output.
Writes model/ (a full Hugging Face folder; a LoRA adapter is merged when selfplay.dpo.lora.merge),
dpo_metrics.json, dpo_loss.png and dpo_heldout.png.

Several GPUs / DeepSpeed: torchrun --nproc_per_node 8 -m medcritical.cli dpo ... \\
    --set selfplay.dpo.deepspeed=recipes/deepspeed/zero3.json""",
    )
    add_recipe_arguments(dpo)
    dpo.add_argument(
        "--pairs", required=True, metavar="FILE", help="pairs.jsonl of a rollout, or its folder; a path or s3:// URI"
    )
    dpo.add_argument("--heldout", metavar="FILE", help="held-out pairs; default: pairs_heldout.jsonl beside --pairs")
    dpo.add_argument("--model", metavar="PATH", help="the model to improve (the SFT model); default: model.base")
    dpo.add_argument("--output", required=True, metavar="DIR", help="folder for checkpoints, model/ and metrics")
    add_restart_argument(dpo)
    dpo.set_defaults(func=_dpo)


def _add_selfplay(subparsers) -> None:
    """`medcritical selfplay`: R rounds, each from the previous round's model."""
    rounds = subparsers.add_parser(
        "selfplay",
        help="R rounds of rollout → correction → pairs → DPO, each from the previous round's model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SELFPLAY_HELP,
    )
    add_recipe_arguments(rounds)
    _questions_argument(rounds)
    rounds.add_argument("--eval-questions", metavar="FILE", help="CMExam questions to score each round's model on")
    rounds.add_argument(
        "--model",
        metavar="PATH",
        help="the starting (SFT) model: a model folder, a training step's folder or 'tiny'; default: model.base",
    )
    rounds.add_argument("--output", required=True, metavar="DIR", help="folder for all rounds")
    rounds.set_defaults(func=_selfplay)


def _add_arms(subparsers) -> None:
    """`medcritical arms`: finished stage-2 runs side by side."""
    arms = subparsers.add_parser(
        "arms",
        help="stage-2 arms side by side (e.g. self- vs teacher-corrected): accuracy, pairs, cost per pair",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
One Markdown table with a column per finished run (`medcritical run` or `medcritical selfplay` output):
CMExam accuracy before/after stage 2 and the questions gained/lost (exact McNemar), rollout pass@1,
accepted corrections against what guessing explains, pair diagnostics, held-out reward accuracy after
the first DPO epoch, tokens / seconds / money per pair. Example:

    medcritical arms self=runs/demo-arm-self teacher=runs/demo-arm-teacher --output runs/arms.md""",
    )
    arms.add_argument("runs", nargs="+", metavar="NAME=DIR", help="an arm's name and its run folder")
    arms.add_argument("--output", metavar="FILE", help="also write the table to this Markdown file")
    arms.set_defaults(func=_arms)


def _questions_argument(parser) -> None:
    parser.add_argument(
        "--questions",
        metavar="FILE",
        help="training questions (.jsonl/.csv/.xlsx) or the prepare-data folder, a path or s3:// URI; "
        "default: the recipe's train split. A file is checked for leakage against the recipe's evaluation "
        "questions first (data.on_leakage)",
    )


def _questions(args, recipe):
    from medcritical.data.cmexam import load_questions
    from medcritical.data.prepare import TRAIN_FILE
    from medcritical.orchestration.staging import input_file

    with questions_uri(args.questions, recipe) as uri:
        return load_questions(input_file(uri, TRAIN_FILE), recipe.data.on_bad_row).questions


def _rollout(args) -> None:
    from medcritical.orchestration.runner import run_stage
    from medcritical.selfplay.stage import ROLLOUT

    recipe = recipe_from_args(args)
    with training_questions_uri(args.questions, recipe) as questions:
        stats = run_stage(ROLLOUT, recipe, args.output, data=questions, model=args.model, restart=args.restart)
    r, p = stats["rollout"], stats["pairs"]
    print(
        f"pass@1 {r['pass@1']:.3f}  pass@k {r['pass@k']:.3f}  all wrong {r['all_wrong']:.3f}  all right {r['all_right']:.3f}"
    )
    c, cost = stats["correction"], stats["cost"]
    guessed = f" (guessing alone would explain {c['expected_by_guessing']:.1f})" if "expected_by_guessing" in c else ""
    print(
        f"corrected {c['corrected']}/{c['wrong_trajectories']} wrong trajectories ({stats['corrector']['corrector']}){guessed}"
    )
    student, teacher = (
        cost[side]["prompt_tokens"] + cost[side]["completion_tokens"] for side in ("student", "teacher")
    )
    print(
        f"cost: student {student} tokens, teacher {teacher} tokens, "
        f"{cost['seconds']['device_seconds']:.1f} {cost['seconds']['device']}-seconds"
        + (money_estimate(cost["money"]) if cost["money"] else "")
    )
    _print_pairs(p, args.output)


def money_estimate(money: dict) -> str:
    """The rollout's money as printed: the user's prices times the counted tokens and seconds, so an
    estimate, in the currency the prices were given in (selfplay.cost.currency)."""
    return f", estimated {money['total']:.4g} {money.get('currency') or 'USD'} (at your selfplay.cost prices)"


def _pairs(args) -> None:
    from medcritical.selfplay.run import make_pairs

    recipe = recipe_from_args(args)
    _print_pairs(
        make_pairs(recipe.selfplay, _questions(args, recipe), args.rollout, args.output, seed=recipe.run.seed),
        args.output,
    )


def _print_pairs(stats: dict, output: str) -> None:
    print(f"pairs: {stats['train_pairs']} train + {stats['heldout_pairs']} held-out -> {output}/pairs.jsonl")
    if "no_pairs" in stats:
        print(f"no pairs: {stats['no_pairs']}")


def _dpo(args) -> None:
    from medcritical.orchestration.runner import run_stage
    from medcritical.selfplay.stage import DPO

    metrics = run_stage(
        DPO, recipe_from_args(args), args.output, rollout=args.pairs, model=args.model, heldout=args.heldout
    )
    if metrics.get("status") == "skipped":
        print(f"DPO skipped: {metrics['reason']}; the model is unchanged: {metrics['model']}")
    else:
        print(json.dumps({k: metrics[k] for k in ("model", "heldout", "stopped_early") if k in metrics}, indent=2))


def _selfplay(args) -> None:
    from medcritical.orchestration.rounds import run_selfplay

    recipe = recipe_from_args(args)
    with training_questions_uri(args.questions, recipe) as questions:
        summary = run_selfplay(recipe, questions, args.model or "", args.output, eval_uri=args.eval_questions)
    for row in summary["rounds"]:
        print(json.dumps(row, ensure_ascii=False))
    print(f"final model: {summary['final_model']}")


def _arms(args) -> None:
    from pathlib import Path

    from medcritical.core.values import assignment
    from medcritical.orchestration.arms import arm_table, load_arm

    named = {}
    for item in args.runs:
        name, folder = assignment(item, option="arms", form="NAME=DIR (one per arm)", example="self=runs/demo-arm-self")
        if not folder:
            raise InputError(f"arms {item!r}: no folder after '='; e.g. arms self=runs/demo-arm-self")
        named[name] = load_arm(folder)
    table = arm_table(named)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table, encoding="utf-8")

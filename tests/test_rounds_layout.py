"""The round loop's layout (`medcritical selfplay`): the folders it writes, as its --help describes them and
as `arms` reads them, local or under an s3:// URI. The stages are stand-ins that record their output URIs
and write their statistics file: the layout, not the training, is under test here."""

import json
import re
from pathlib import Path

import medcritical.orchestration.rounds as rounds
from medcritical.orchestration.recipe import load_recipe


class FakeStages:
    """`run_stage` for the round loop: a DPO round at or after `skip_from` makes no pairs (skipped)."""

    def __init__(self, skip_from: int | None = None):
        self.skip_from = skip_from
        self.outputs: list[str] = []

    def __call__(self, stage, recipe, output_uri, **given):
        self.outputs.append(output_uri)
        if stage.name == "evaluate":
            stats = {"protocol": "mcq", "accuracy": 0.5, "correct": 1, "n": 2}
        elif stage.name == "rollout":
            stats = {
                "rollout": {"pass@1": 0.5, "pass@k": 1.0},
                "correction": {"correction_rate": 0.0, "corrected": 0},
                "cost": {"per_pair": {}},
                "pairs": {"pairs": 2, "train_pairs": 2, "heldout_pairs": 0},
            }
        else:
            round_number = int(re.search(r"round(\d+)-", output_uri).group(1))
            skipped = self.skip_from is not None and round_number >= self.skip_from
            stats = {"status": "skipped", "reason": "no training pairs"} if skipped else {"status": "trained"}
        if not output_uri.startswith("s3://"):
            Path(output_uri).mkdir(parents=True, exist_ok=True)
            (Path(output_uri) / stage.stats).write_text(json.dumps(stats), encoding="utf-8")
        return stats


def _run(monkeypatch, output: str, rounds_in_recipe: int, skip_from: int | None = None) -> tuple[dict, FakeStages]:
    stages = FakeStages(skip_from)
    monkeypatch.setattr(rounds, "run_stage", stages)
    recipe = load_recipe(None, [f"selfplay.rounds={rounds_in_recipe}"])
    return rounds.run_selfplay(recipe, "questions.jsonl", "start-model", output, eval_uri="eval.jsonl"), stages


def test_arms_finds_the_final_evaluation_after_an_early_stop(monkeypatch, tmp_path):
    from medcritical.orchestration.arms import load_arm

    summary, _ = _run(monkeypatch, str(tmp_path / "sp"), rounds_in_recipe=3, skip_from=2)
    assert summary["stopped"].startswith("round 2") and summary["final_eval"]["accuracy"] == 0.5
    arm = load_arm(tmp_path / "sp")
    assert len(arm["rounds"]) == 2
    assert arm["before"] is not None and arm["after"] == summary["final_eval"]


def _described_layout(rounds_run: int) -> set[str]:
    """The files and folders `medcritical selfplay --help` says a run writes, for `rounds_run` rounds."""
    from medcritical.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(subparsers.choices["selfplay"].format_help().split())
    names = set(
        re.findall(
            r"[\w<>-]+/|[\w-]+\.(?:json|png)", text.partition("Writes into --output")[2].partition("options:")[0]
        )
    )
    assert names, f"no layout in the help text:\n{text}"
    layout = set()
    for name in names:
        if "<r>" in name:
            layout |= {name.replace("<r>", str(r)) for r in range(1, rounds_run + 1)}
        else:
            layout.add(name.replace("<R>", str(rounds_run)))
    return {name.rstrip("/") for name in layout}


def test_selfplay_help_describes_the_folders_a_run_writes(monkeypatch, tmp_path):
    _run(monkeypatch, str(tmp_path / "sp"), rounds_in_recipe=2)
    written = {p.name for p in (tmp_path / "sp").iterdir()}
    assert _described_layout(2) == written


def test_selfplay_into_an_s3_uri_writes_there_never_into_a_local_s3_folder(monkeypatch, tmp_path, s3_env):
    from medcritical import storage

    monkeypatch.chdir(tmp_path)
    root = f"s3://{s3_env}/runs/sp"
    summary, stages = _run(monkeypatch, root, rounds_in_recipe=1)
    assert not (tmp_path / "s3:").exists()
    assert stages.outputs == [
        f"{root}/round1-eval",
        f"{root}/round1-rollout",
        f"{root}/round1-dpo",
        f"{root}/eval-dpo-round1",
    ]
    assert summary["final_model"] == f"{root}/round1-dpo"
    stats = storage.materialize(f"{root}/selfplay_stats.json", tmp_path / "fetched")
    assert json.loads(stats.read_text(encoding="utf-8")) == summary


def test_arms_refuses_an_s3_run_folder_by_its_uri(tmp_path, monkeypatch, capsys):
    from medcritical.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["arms", "self=s3://bucket/runs/self"]) == 2
    err = capsys.readouterr().err
    assert "s3://bucket/runs/self: arms reads a local run folder; copy the run from S3 first" in err
    assert not (tmp_path / "s3:").exists()

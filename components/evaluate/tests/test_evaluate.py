"""`evaluate` called as a KFP task would: a Model (or none: the recipe's base) in, Metrics naming the folder out."""

import json
from pathlib import Path


def test_evaluate_scores_each_model_into_its_metrics(run, evaluations):
    for label, name in (("base", "eval-base"), ("sft", "eval-sft"), ("dpo (round 1)", "eval-dpo-round1")):
        metrics = evaluations[label]
        assert metrics.metadata["location"] == run.folder(name)
        report = json.loads((Path(metrics.metadata["location"]) / "report.json").read_text())
        assert report["n"] == 8 and report["label"] == label
        assert metrics.metadata["accuracy"] == report["accuracy"]

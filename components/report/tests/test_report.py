"""`report` called as a KFP task would: the three evaluations' Metrics and the traces in, the summary Markdown out."""

from pathlib import Path

from kfp import dsl

from medcritical.components import report


def test_report_puts_the_three_models_side_by_side(run, evaluations, distilled, preferred, tmp_path):
    metrics, summary = dsl.Metrics(name="metrics"), dsl.Markdown(name="summary", uri=str(tmp_path / "summary"))
    report(run.recipe, str(run.root), "report", *evaluations.values(), distilled[0], metrics, summary, preferred[0])
    assert summary.metadata["location"] == run.folder("report")
    markdown = Path(summary.path).read_text()  # what the KFP UI shows
    assert markdown == (Path(run.folder("report")) / "report.md").read_text()
    assert "| sft |" in markdown and "| not run |" not in markdown  # every model evaluated, every step's stats read
    # The rounds' statistics, from the last round's DPO folder (its rounds file).
    assert "- round 1 rollout: questions=" in markdown and "- round 1 dpo: not run" not in markdown
    assert {"accuracy_base", "accuracy_sft", "accuracy_dpo"} <= metrics.metadata.keys()

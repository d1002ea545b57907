"""`distill` called as a KFP task would: traces from the data's Dataset, or an earlier run's reused."""

from pathlib import Path

import pytest
from kfp import dsl

from medcritical.components import distill


def test_distill_reads_the_data_artifact_and_names_its_traces(run, prepared, distilled):
    traces, metrics = distilled
    assert traces.metadata["location"] == run.folder("distill")
    lines = (Path(traces.metadata["location"]) / "sft.jsonl").read_text().splitlines()
    assert len(lines) == metrics.metadata["accepted"] > 0


def test_distill_reuses_an_earlier_runs_traces_without_the_teacher(run, prepared, distilled, tmp_path):
    earlier = distilled[0].metadata["location"]
    metrics, traces = dsl.Metrics(name="metrics"), dsl.Dataset(name="traces", uri=str(tmp_path / "traces"))
    distill(run.recipe, str(tmp_path), "distill", prepared[0], metrics, traces, reuse_uri=earlier)
    assert traces.metadata["location"] == earlier
    assert not (tmp_path / "distill").exists() and metrics.metadata == {}
    with pytest.raises(FileNotFoundError, match="sft.jsonl"):
        distill(run.recipe, str(tmp_path), "distill", prepared[0], metrics, traces, reuse_uri=str(tmp_path))


def test_an_input_from_outside_the_pipeline_is_refused_naming_it(run, tmp_path):
    stray = dsl.Dataset(name="data", uri=str(tmp_path / "somewhere"))
    with pytest.raises(ValueError, match="'data'.*names no step folder"):
        distill(run.recipe, str(tmp_path), "distill", stray, dsl.Metrics(), dsl.Dataset(name="traces"))

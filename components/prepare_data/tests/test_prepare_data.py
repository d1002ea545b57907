"""`prepare_data` called as a KFP task would: its Dataset names the data folder it wrote."""

import json
from pathlib import Path


def test_prepare_data_writes_the_splits_and_names_its_folder(run, prepared):
    data, metrics = prepared
    assert data.metadata["location"] == run.folder("data")
    folder = Path(data.metadata["location"])
    assert len((folder / "train.jsonl").read_text().splitlines()) == 16
    assert len((folder / "eval.jsonl").read_text().splitlines()) == 8
    assert json.loads((folder / "data_stats.json").read_text())["train"] == 16
    assert metrics.metadata["train"] == 16 and metrics.metadata["eval"] == 8
    assert not Path(data.path).exists()  # nothing through KFP's artifact store: the folder is the data

"""`sft` called as a KFP task would: the traces' Dataset in, a Model naming the trained folder out."""

import json
from pathlib import Path


def test_sft_trains_the_recipes_base_model_on_the_traces(run, distilled, fine_tuned):
    model, metrics = fine_tuned
    assert model.metadata["location"] == run.folder("sft")
    folder = Path(model.metadata["location"])
    assert (folder / "model" / "config.json").is_file()
    stats = json.loads((folder / "sft_metrics.json").read_text())
    assert stats["steps"] == 4 and metrics.metadata["steps"] == 4
    assert metrics.metadata["loss_first"] > 0

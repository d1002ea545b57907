"""`dpo` called as a KFP task would: the pairs' Dataset and the SFT Model in, the DPO Model out."""

import json
from pathlib import Path


def test_dpo_trains_from_the_sft_model_on_the_pairs(run, fine_tuned, preferred):
    model, metrics = preferred
    assert model.metadata["location"] == run.folder("round1-dpo")
    folder = Path(model.metadata["location"])
    stats = json.loads((folder / "dpo_metrics.json").read_text())
    if stats["status"] == "trained":
        assert (folder / "model" / "config.json").is_file() and metrics.metadata["steps"] == 2
    else:  # no pairs this round: the folder names the SFT model it kept
        assert (folder / "model.uri").read_text() == fine_tuned[0].metadata["location"]

"""`rollout` called as a KFP task would: the data's Dataset and the SFT Model in, the pairs' Dataset out."""

from pathlib import Path


def test_rollout_samples_the_model_and_names_its_pairs(run, played):
    pairs, metrics = played
    assert pairs.metadata["location"] == run.folder("round1-rollout")
    folder = Path(pairs.metadata["location"])
    assert (folder / "pairs.jsonl").is_file() and (folder / "rollout_stats.json").is_file()
    assert metrics.metadata["rollout.samples"] == 32  # 16 training questions x 2 samples

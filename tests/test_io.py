"""The shared file concerns: JSONL logs, resume fingerprints, folder manifests and the output lock."""

import os
import subprocess
import sys

import pytest

from medcritical.io.fingerprint import ResumeMismatch, check_resume, model_fingerprint
from medcritical.io.hashing import file_sha256
from medcritical.io.jsonl import JsonlError, append_jsonl, read_jsonl, write_jsonl
from medcritical.io.lock import output_lock
from medcritical.io.manifest import (
    MANIFEST_NAME,
    ManifestError,
    checksums,
    read_manifest,
    verify_manifest,
    write_manifest,
)


def test_torn_last_line_is_dropped_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl([{"id": 1}], path)
    with path.open("a") as f:
        f.write('{"id": 2, "out')  # a crash mid-write
    assert read_jsonl(path) == [{"id": 1}]
    append_jsonl([{"id": 3}], path)
    assert read_jsonl(path) == [{"id": 1}, {"id": 3}]
    assert path.read_text().count("\n") == 2


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(JsonlError, match=r"log.jsonl: line 2"):
        read_jsonl(path)


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    write_jsonl([{"a": "中文"}], tmp_path / "x.jsonl")
    assert read_jsonl(tmp_path / "x.jsonl") == [{"a": "中文"}]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_resume_refuses_other_inputs_and_restart_discards(tmp_path):
    assert not check_resume(tmp_path, {"model": "m1", "questions": "q"}, outputs=["outputs.jsonl"])
    append_jsonl([{"id": 1}], tmp_path / "outputs.jsonl")
    assert check_resume(tmp_path, {"model": "m1", "questions": "q"}, outputs=["outputs.jsonl"])
    with pytest.raises(ResumeMismatch, match=r"model: m1 -> m2.*--restart"):
        check_resume(tmp_path, {"model": "m2", "questions": "q"}, outputs=["outputs.jsonl"])
    assert not check_resume(tmp_path, {"model": "m2", "questions": "q"}, outputs=["outputs.jsonl"], restart=True)
    assert not (tmp_path / "outputs.jsonl").exists()


def test_other_ranks_check_but_leave_recording_and_discarding_to_the_main_process(tmp_path):
    outputs = ["checkpoints"]
    assert not check_resume(tmp_path, {"seed": 1}, outputs=outputs, write=False)
    assert not (tmp_path / "fingerprint.json").exists()
    check_resume(tmp_path, {"seed": 1}, outputs=outputs)
    (tmp_path / "checkpoints").mkdir()
    assert check_resume(tmp_path, {"seed": 1}, outputs=outputs, write=False)
    with pytest.raises(ResumeMismatch, match=r"seed: 1 -> 2.*Rerun with --restart"):
        check_resume(tmp_path, {"seed": 2}, outputs=outputs, write=False)
    # restart on another rank: nothing resumed, nothing deleted there (the main process discards)
    assert not check_resume(tmp_path, {"seed": 2}, outputs=outputs, restart=True, write=False)
    assert (tmp_path / "checkpoints").is_dir() and "1" in (tmp_path / "fingerprint.json").read_text()


def test_outputs_without_a_fingerprint_are_not_trusted(tmp_path):
    append_jsonl([{"id": 1}], tmp_path / "outputs.jsonl")
    with pytest.raises(ResumeMismatch, match="no record of what made them"):
        check_resume(tmp_path, {"model": "m"}, outputs=["outputs.jsonl"])


def test_model_fingerprint_follows_weights_not_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    assert model_fingerprint(tmp_path / "a") == model_fingerprint(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"retrained")
    assert model_fingerprint(tmp_path / "a") != model_fingerprint(tmp_path / "b")


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    with output_lock(tmp_path, "evaluate"):
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from medcritical.io.lock import output_lock\nwith output_lock({str(tmp_path)!r}): pass",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0
        assert "another run is writing here (evaluate by PID" in other.stderr
    with output_lock(tmp_path):  # released: free again
        pass


def test_lock_of_a_killed_process_is_stale(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time\nfrom medcritical.io.lock import output_lock\n"
            f"with output_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with output_lock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_manifest_checksums_are_reused_while_files_are_unchanged(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(b"weights")
    hashed = model_fingerprint(run / "model")  # no manifest yet: every file read
    write_manifest(run, [run / "model"])
    assert verify_manifest(run) == [] and model_fingerprint(run / "model") == hashed
    # Same size and mtime: the manifest's checksum is trusted, the file is not read again.
    before = weights.stat()
    weights.write_bytes(b"WEIGHTS")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert model_fingerprint(run / "model") == hashed
    assert verify_manifest(run) == ["model/model.safetensors"]  # a real check reads every byte
    # A rewrite that moves the mtime is hashed again.
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    assert model_fingerprint(run / "model") != hashed
    assert checksums(run, ["model/model.safetensors"])[0].sha256 == file_sha256(weights)


def test_unreadable_manifest_names_the_file(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"format": "something-else/9", "files": []}')
    with pytest.raises(ManifestError, match=f"{MANIFEST_NAME}: not a manifest this version understands.*rerun"):
        read_manifest(tmp_path)

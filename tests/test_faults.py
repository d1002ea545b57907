"""Fault suite: real faults, then a rerun. Each test below is one row of docs/reliability.md.

- kill -9: the step runs as a subprocess (the `medcritical` CLI) and is killed by SIGKILL when its
  output shows it reached a point (its lock taken, its append-only log grown, a checkpoint saved);
  the rerun must finish with exit 0, nothing lost, nothing duplicated.
- concurrent runs: a second run into a folder in use stops at once (exit 2), naming the holder.
- S3: wrong credentials or a missing bucket stop a step before any work; the S3 server is killed
  and restarted in the middle of an upload; an uploader killed mid multipart upload leaves nothing
  behind after the rerun. All against the real SeaweedFS server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medcritical import storage
from medcritical.io.jsonl import read_jsonl
from medcritical.io.lock import LOCK_FILE

pytestmark = pytest.mark.slow  # end-to-end: left out of the quick lane (README, Tests)

TIMEOUT_S = 300
# Small, fast settings for the tiny model on one CPU thread.
FAST = [
    "--set",
    "run.device=cpu",
    "--set",
    "run.threads=1",
    "--set",
    "generation.max_new_tokens=8",
    "--set",
    "generation.batch_size=4",
]


def _env(tmp: Path) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "MEDCRITICAL_WORKDIR": str(tmp / "work"),
        "PYTHONUNBUFFERED": "1",
    }


def medcritical(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medcritical.cli", *args],
        capture_output=True,
        text=True,
        env=env or _env(tmp),
        timeout=TIMEOUT_S,
    )


def start(tmp: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    log = open(tmp / f"run-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (the child process writes it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcritical.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or _env(tmp),
    )
    proc.log = log  # what it printed, for the failure message
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def kill_when(proc: subprocess.Popen, reached, what: str, timeout: float = TIMEOUT_S) -> None:
    """SIGKILL `proc` as soon as `reached()` holds (polled every 20 ms); fail if it ended first."""
    deadline = time.monotonic() + timeout
    while not reached():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before the kill point ({what}):\n{_output(proc)[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"kill point ({what}) not reached in {timeout} s:\n{_output(proc)[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def holds_lock(folder: Path, pid: int) -> bool:
    try:
        return json.loads((folder / LOCK_FILE).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """prepare-data output of the bundled sample: 8 evaluation and 8 training questions."""
    from medcritical.data.config import DataSection
    from medcritical.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data")
    prepare_data(DataSection(eval_size=8, train_size=8), 0, out)
    return out


# -- kill -9 and rerun, step by step ------------------------------------------------------------------------


def test_prepare_data_killed_at_its_start_then_rerun(tmp_path, data_dir):
    out = tmp_path / "data"
    args = ["prepare-data", "--set", "data.eval_size=8", "--set", "data.train_size=8", "--output", str(out)]
    proc = start(tmp_path, *args)
    kill_when(proc, lambda: holds_lock(out, proc.pid), "the step took its output folder's lock")
    rerun = medcritical(tmp_path, *args)
    assert_ok(rerun)
    assert "train 8, eval 8" in rerun.stdout
    for name in ("train.jsonl", "eval.jsonl"):  # the same split as an uninterrupted run
        assert (out / name).read_bytes() == (data_dir / name).read_bytes()


def test_evaluate_killed_while_generating_concurrent_run_refused_torn_line_dropped(tmp_path, tiny_model, data_dir):
    out = tmp_path / "eval"
    args = [
        "evaluate",
        *FAST,
        "--set",
        "evaluate.limit=8",
        "--model",
        str(tiny_model),
        "--dataset",
        str(data_dir),
        "--output",
        str(out),
    ]
    first = start(tmp_path, *args)
    deadline = time.monotonic() + TIMEOUT_S
    while not holds_lock(out, first.pid):
        assert first.poll() is None and time.monotonic() < deadline, _output(first)
        time.sleep(0.02)

    # A second run into the same folder stops at once, naming the holder. The holder is paused meanwhile
    # (SIGSTOP): eight questions on the tiny model take less time than a second process takes to start.
    first.send_signal(signal.SIGSTOP)
    try:
        second = medcritical(tmp_path, *args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"another run is writing here (evaluate by PID {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr

    kill_when(first, lambda: True, "the first run holds the lock and is generating")
    assert_ok(medcritical(tmp_path, *args))  # the lock of the killed run is stale by construction
    outputs = read_jsonl(out / "outputs.jsonl")
    assert len(outputs) == len({r["id"] for r in outputs}) == 8
    assert json.loads((out / "report.json").read_text())["n"] == 8

    # A crash in the middle of an append leaves a torn last line: dropped with a warning, that row redone.
    lines = (out / "outputs.jsonl").read_bytes().splitlines(keepends=True)
    (out / "outputs.jsonl").write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    (out / "report.json").unlink()
    rerun = medcritical(tmp_path, *args)
    assert_ok(rerun)
    assert "torn last line" in rerun.stderr
    assert read_jsonl(out / "outputs.jsonl") == outputs  # greedy decoding: the redone rows are the same


def test_rollout_killed_after_a_chunk_and_during_corrections_then_rerun(tmp_path, tiny_model, data_dir):
    out = tmp_path / "rollout"
    args = [
        "rollout",
        *FAST,
        "--set",
        "selfplay.rollout.samples_per_question=2",
        "--set",
        "selfplay.rollout.chunk_size=2",
        "--set",
        "selfplay.rollout.max_new_tokens=8",
        "--set",
        "selfplay.correction.attempts=1",
        "--model",
        str(tiny_model),
        "--questions",
        str(data_dir),
        "--output",
        str(out),
    ]
    proc = start(tmp_path, *args)
    kill_when(proc, lambda: complete_lines(out / "rollouts.jsonl") >= 2, "the first chunk appended to rollouts.jsonl")
    kept = complete_lines(out / "rollouts.jsonl")
    assert 2 <= kept < 16
    proc = start(tmp_path, *args)  # the rerun, killed again once self-correction has appended a chunk
    kill_when(
        proc, lambda: complete_lines(out / "corrections.jsonl") >= 1, "the first chunk appended to corrections.jsonl"
    )
    assert complete_lines(out / "rollouts.jsonl") == 16
    assert_ok(medcritical(tmp_path, *args))
    rollouts = read_jsonl(out / "rollouts.jsonl")
    keys = [(r["question_id"], r["sample"]) for r in rollouts]
    assert len(keys) == len(set(keys)) == 16  # 8 questions x 2 samples: nothing lost, nothing twice
    corrections = read_jsonl(out / "corrections.jsonl")
    assert len({(c["question_id"], c["sample"]) for c in corrections}) == len(corrections)


def test_distill_killed_mid_log_then_rerun(tmp_path):
    from medcritical.data.bundled import bundled_path

    out = tmp_path / "distill"
    # 400 questions, offline backend; no evaluation split (it would be checked against, and 100 left out)
    args = ["distill", "--set", "data.eval_size=0", "--questions", str(bundled_path()), "--output", str(out)]
    for events in (30, 200):  # killed twice: early, then in the rerun
        proc = start(tmp_path, *args)
        kill_when(
            proc, lambda: complete_lines(out / "distill_raw.jsonl") >= events, f"{events} events in distill_raw.jsonl"
        )
    assert_ok(medcritical(tmp_path, *args))
    replies = [e for e in read_jsonl(out / "distill_raw.jsonl") if e["event"] == "reply"]
    keys = [(e["id"], e["kind"], e["attempt"]) for e in replies]
    assert len(keys) == len(set(keys))  # no teacher reply asked or recorded twice
    sft = read_jsonl(out / "sft.jsonl")
    stats = json.loads((out / "distill_stats.json").read_text())
    assert stats["questions"] == 400 and len(sft) == stats["accepted"] > 0


def test_sft_killed_after_a_checkpoint_resumes(tmp_path, tiny_model, data_dir):
    from medcritical.data.cmexam import load_questions
    from medcritical.distill.config import DistillSection
    from medcritical.distill.run import distill

    distill(
        DistillSection(explanation_max_chars=40),
        load_questions(data_dir / "train.jsonl").questions,
        tmp_path / "distill",
    )
    out = tmp_path / "sft"
    args = [
        "sft",
        "--set",
        "run.device=cpu",
        "--set",
        "run.threads=1",
        "--set",
        "sft.trainer.max_steps=4",
        "--set",
        "sft.trainer.save_steps=2",
        "--set",
        "sft.trainer.per_device_train_batch_size=2",
        "--set",
        "sft.trainer.max_length=512",
        "--set",
        "sft.trainer.logging_steps=1",
        "--dataset",
        str(tmp_path / "distill"),
        "--model",
        str(tiny_model),
        "--output",
        str(out),
    ]
    proc = start(tmp_path, *args)
    kill_when(
        proc, lambda: (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file(), "checkpoint-2 saved"
    )
    assert not (out / "model").exists()  # nothing published by the killed run
    assert_ok(medcritical(tmp_path, *args))
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["steps"] == 4
    assert (out / "model" / "config.json").is_file()


# -- S3: fail before the work; the server stopped mid-transfer; an uploader killed mid multipart upload ------


@pytest.mark.parametrize("fault", ["wrong credentials", "missing bucket"])
def test_s3_output_fault_stops_a_step_before_any_work(s3_env, monkeypatch, tmp_path, fault, capsys):
    from medcritical.cli import main
    from medcritical.orchestration import runner

    bucket = s3_env
    if fault == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = "rejected the credentials"
    else:
        bucket, expected = "no-such-bucket", "bucket 'no-such-bucket' does not exist"

    def work(*args, **kwargs):
        raise AssertionError("the step started its work before the S3 output was checked")

    monkeypatch.setattr(runner, "local_inputs", work)
    monkeypatch.setenv("MEDCRITICAL_WORKDIR", str(tmp_path / "work"))
    started = time.monotonic()
    code = main(["evaluate", "--model", "tiny", "--dataset", "x.jsonl", "--output", f"s3://{bucket}/run/eval"])
    assert code == 2 and time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and os.environ["AWS_SECRET_ACCESS_KEY"] not in err


def _restart(server) -> None:
    """Start the killed server again on the same ports and data folder (the fixture's command line)."""
    proc = server._proc
    log = open(server.log_path, "ab")  # noqa: SIM115 (the server process writes it)
    server._proc = subprocess.Popen(
        proc.args,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=server.log_path.parent,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(server._sockets)},
    )
    server.pid = server._proc.pid
    from tests.fixtures.s3 import _wait_ready

    _wait_ready(server)


def _unfinished_uploads(client, bucket) -> list:
    return client._list_multipart_uploads(bucket).uploads


@pytest.fixture
def own_s3_server(tmp_path, monkeypatch):
    """A server of this test's own, so it can be killed and restarted without touching the shared one."""
    from tests.fixtures.s3 import _start, _stop, _wait_ready

    (tmp_path / "s3").mkdir()
    server = _start(tmp_path / "s3", "fault-test", "fault-secret")
    try:
        _wait_ready(server)
        monkeypatch.setenv("MEDCRITICAL_S3_ENDPOINT", server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        yield server
    finally:
        _stop(server)


def test_s3_server_killed_mid_upload_then_restarted_rerun_completes(own_s3_server, tmp_path, monkeypatch):
    server = own_s3_server
    client = server.client()
    bucket = server.new_bucket()
    monkeypatch.setattr(storage.client, "RETRY", storage.RetryPolicy(attempts=2, base_delay=0.1))
    folder = tmp_path / "model"
    folder.mkdir()
    for i in range(3):
        (folder / f"shard-{i}.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    uri = f"s3://{bucket}/run/sft"
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            storage.upload(folder, uri, max_workers=2, part_size=5 * 1024 * 1024)
        except BaseException as exc:  # noqa: BLE001 - the failure is what the test checks
            failure.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 60
    while not _unfinished_uploads(client, bucket):
        assert thread.is_alive() and time.monotonic() < deadline, "the upload finished before the server was stopped"
        time.sleep(0.01)
    server._proc.send_signal(signal.SIGKILL)  # the server dies mid multipart upload
    server._proc.wait()
    thread.join(timeout=120)
    assert failure and isinstance(failure[0], storage.StorageError)
    assert "cannot reach the S3 endpoint" in str(failure[0]) and "rerun the step" in str(failure[0])

    _restart(server)
    # Readers never see the half upload as complete: nothing there, or objects without a manifest.
    with pytest.raises((storage.IncompleteUploadError, storage.ObjectNotFoundError)):
        storage.download(uri, tmp_path / "half")
    storage.upload(folder, uri, max_workers=2, part_size=5 * 1024 * 1024)  # the rerun
    assert _unfinished_uploads(server.client(), bucket) == []  # the abandoned parts were aborted
    storage.download(uri, tmp_path / "back")
    for path in folder.iterdir():
        assert (tmp_path / "back" / path.name).read_bytes() == path.read_bytes()


def test_uploader_killed_mid_multipart_upload_rerun_leaves_none_behind(s3_env, s3_server, tmp_path):
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(40 * 1024 * 1024))
    uri = f"s3://{s3_env}/run/dpo/model/weights.bin"
    client = s3_server.client()
    code = (
        f"from medcritical import storage; storage.upload({str(big)!r}, {uri!r}, max_workers=1, "
        "part_size=5 * 1024 * 1024)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    while not _unfinished_uploads(client, s3_env):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _unfinished_uploads(client, s3_env)  # the killed run left its parts on the server
    storage.check_output(f"s3://{s3_env}/run/dpo")  # what the rerun's step does first
    assert _unfinished_uploads(client, s3_env) == []
    storage.upload(big, uri)
    assert client.stat_object(s3_env, "run/dpo/model/weights.bin").size == big.stat().st_size

"""One writer per s3:// output (storage/lease.py), against the real S3 server: a second worker with its own work
folder is refused at its start, naming the holder; a dead worker's lease is taken over; the lease is gone when the
step ends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from medcritical.storage.folders import read_small_object, write_small_object
from medcritical.storage.lease import LEASE_NAME, OutputInUse, writer_lease
from tests.test_faults import medcritical


def _lease(uri: str) -> dict | None:
    body = read_small_object(f"{uri}/{LEASE_NAME}")
    return json.loads(body) if body else None


def test_a_second_worker_with_its_own_work_folder_is_refused_at_its_start(s3_env, tmp_path):
    """As two pods writing one output: this process holds the lease, another process (its own MEDCRITICAL_WORKDIR,
    so the local flock cannot see the first) runs prepare-data into the same URI."""
    output = f"s3://{s3_env}/runs/two-workers/data"
    with writer_lease(output, "prepare_data"):
        held = _lease(output)
        result = medcritical(tmp_path, "prepare-data", "--output", output)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{output}: another worker is writing here (prepare_data by PID {held['pid']}" in result.stderr
    assert "Traceback" not in result.stderr
    assert _lease(output) is None  # released when the holder's step ended
    assert medcritical(tmp_path, "prepare-data", "--output", output).returncode == 0  # now it may
    assert _lease(output) is None and read_small_object(f"{output}/data_stats.json") is not None


def test_a_lease_left_by_a_killed_process_of_this_host_is_taken_over_at_once(s3_env):
    output = f"s3://{s3_env}/runs/killed/data"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with writer_lease(output, "sft"):
        lease = _lease(output)
    write_small_object(f"{output}/{LEASE_NAME}", json.dumps(lease | {"pid": int(dead.stdout)}).encode())
    with writer_lease(output, "sft"):
        assert _lease(output)["holder"] != lease["holder"]
    # A restarted container keeps its host name and may get the same PID: a running PID that started at another
    # time is not the holder.
    write_small_object(f"{output}/{LEASE_NAME}", json.dumps(lease | {"pid_start": "1"}).encode())
    with writer_lease(output, "sft"):
        assert _lease(output)["holder"] != lease["holder"]


def _other_pod(uri: str, renewing: bool, stop: threading.Event) -> None:
    """A lease of a worker on another host, renewed every 0.1 s while `renewing`."""
    lease = {"holder": "other", "what": "sft", "host": "other-pod", "pid": 7, "since": "then", "renewals": 0}
    write_small_object(f"{uri}/{LEASE_NAME}", json.dumps(lease).encode())
    while renewing and not stop.wait(0.1):
        lease["renewals"] += 1
        write_small_object(f"{uri}/{LEASE_NAME}", json.dumps(lease).encode())


@pytest.mark.parametrize("renewing", [True, False], ids=["alive", "dead"])
def test_a_worker_on_another_host_is_refused_while_it_renews_and_taken_over_when_it_stops(
    s3_env, monkeypatch, renewing
):
    """Liveness across hosts is the counter moving, not clocks: refused once it is seen renewing, taken over after
    three renewal periods without a change."""
    monkeypatch.setenv("MEDCRITICAL_S3_LEASE_RENEW_S", "0.4")
    output = f"s3://{s3_env}/runs/other-host-{'alive' if renewing else 'dead'}/sft"
    stop = threading.Event()
    other = threading.Thread(target=_other_pod, args=(output, renewing, stop))
    other.start()
    try:
        other.join(0.3) if renewing else other.join()
        if renewing:
            in_use = r"another worker is writing here \(sft by PID 7 on host other-pod"
            with pytest.raises(OutputInUse, match=in_use), writer_lease(output, "sft"):
                pass
        else:
            with writer_lease(output, "sft"):
                assert _lease(output)["holder"] != "other"
            assert _lease(output) is None
    finally:
        stop.set()
        other.join()


def test_the_lease_is_renewed_while_the_step_runs_and_removed_when_it_fails(s3_env, monkeypatch):
    monkeypatch.setenv("MEDCRITICAL_S3_LEASE_RENEW_S", "0.2")
    output = f"s3://{s3_env}/runs/failing/sft"
    with pytest.raises(RuntimeError, match="the step failed"), writer_lease(output, "sft"):
        first = _lease(output)["renewals"]
        threading.Event().wait(1.0)
        assert _lease(output)["renewals"] > first
        raise RuntimeError("the step failed")
    assert _lease(output) is None

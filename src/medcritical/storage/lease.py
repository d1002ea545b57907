"""One writer per S3 output: a lease object in the output folder while a step writes there.

A local output has its flock (io/lock.py); an `s3://` output is written from a local scratch folder that two
workers (two pods, two machines) each have their own of, so the flock cannot see the other one. Without a
lease a second worker would abort the first one's multipart uploads at its start (`check_output`) and train
for hours before its upload is refused. With it the second worker is refused at its start, naming the holder.

The lease, `<output>/_WRITER.json`, holds the writer's host, PID (as the local lock file does) and a counter it renews every
`MEDCRITICAL_S3_LEASE_RENEW_S` seconds (20). Liveness is read from the counter changing, never from clocks (the
pods' clocks may differ): a lease whose counter has not moved for three renewal periods belongs to a dead
worker and is taken over (a retried pod waits up to a minute); one left by a dead process on the same host is
taken over at once. It is removed when the step ends, failed or not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from medcritical.errors import UserError
from medcritical.io.lock import describe_holder, holder_record
from medcritical.storage.client import s3_session, with_retries
from medcritical.storage.folders import read_small_object, write_small_object

log = logging.getLogger(__name__)

LEASE_NAME = "_WRITER.json"
STALE_AFTER_RENEWALS = 3
_held: set[str] = set()  # the leases this process holds


class OutputInUse(UserError, RuntimeError):
    """Another worker is writing into the same s3:// output."""


def renew_every_s() -> float:
    return float(os.environ.get("MEDCRITICAL_S3_LEASE_RENEW_S", "20"))


@contextlib.contextmanager
def writer_lease(output_uri: str, what: str) -> Iterator[None]:
    """Hold the output's lease while the body runs; `OutputInUse` when a live worker holds it."""
    lease_uri = f"{output_uri.rstrip('/')}/{LEASE_NAME}"
    if lease_uri in _held:  # a step that calls another step's code into the same output: one lease
        yield
        return
    mine = holder_record(what) | {"holder": uuid.uuid4().hex, "pid_start": _process_start(os.getpid()), "renewals": 0}
    _acquire(lease_uri, output_uri, mine)
    _held.add(lease_uri)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease_uri, mine, stop), name="s3-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        _held.discard(lease_uri)
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):  # the body's own error matters more than a failed cleanup
            if _holder(_read(lease_uri)) == mine["holder"]:
                _remove(lease_uri)


def _acquire(lease_uri: str, output_uri: str, mine: dict) -> None:
    period = renew_every_s()
    seen, unchanged_since, waiting = None, time.monotonic(), False
    while True:
        current = _read(lease_uri)
        if current is None or _dead_here(current):
            if _claim(lease_uri, mine):
                return
            continue
        if _alive_here(current):  # another process of this host: no need to watch it renew
            raise OutputInUse(_in_use(output_uri, current))
        state = (_holder(current), current.get("renewals"))
        now = time.monotonic()
        if seen is not None and state != seen and state[0] == seen[0]:  # it renewed: a live worker
            raise OutputInUse(_in_use(output_uri, current))
        if state != seen:
            seen, unchanged_since = state, now
        elif now - unchanged_since >= STALE_AFTER_RENEWALS * period:
            log.warning("%s: %s stopped renewing its lease; taking over", output_uri, describe_holder(current))
            if _claim(lease_uri, mine):
                return
            continue
        if not waiting:
            log.info("%s: %s holds its lease; waiting to see whether it is alive", output_uri, describe_holder(current))
            waiting = True
        time.sleep(min(period / 4, 5.0))


def _claim(lease_uri: str, mine: dict) -> bool:
    """Write our lease, then read it back after a moment: of two workers writing at once, the last write wins and
    the other sees it."""
    _write(lease_uri, mine)
    time.sleep(min(renew_every_s() / 10, 1.0))
    return _holder(_read(lease_uri)) == mine["holder"]


def _renew(lease_uri: str, mine: dict, stop: threading.Event) -> None:
    while not stop.wait(renew_every_s()):
        try:
            current = _read(lease_uri)
            if _holder(current) != mine["holder"]:
                log.error("%s: the lease is now held by %s; this worker's upload may be refused", lease_uri, current)
                return
            mine["renewals"] += 1
            _write(lease_uri, mine)
        except Exception as e:  # an S3 hiccup must not kill the step; the next renewal tries again
            log.warning("%s: lease not renewed (%s)", lease_uri, e)


def _in_use(output_uri: str, holder: dict) -> str:
    return (
        f"{output_uri}: another worker is writing here ({describe_holder(holder)}); wait for it to finish, stop it, "
        "or choose another output URI"
    )


def _holder(lease: dict | None) -> str | None:
    return (lease or {}).get("holder")


def _alive_here(lease: dict) -> bool:
    """Held by a running process of this host: its PID runs and started when the holder did (a restarted container
    keeps its host name and may get the same small PID)."""
    started = _process_start(lease.get("pid"))
    return lease.get("host") == socket.gethostname() and started is not None and started == lease.get("pid_start")


def _dead_here(lease: dict) -> bool:
    """Left by a process of this host that is gone (killed, or a container restarted): taken over at once."""
    return lease.get("host") == socket.gethostname() and not _alive_here(lease)


def _process_start(pid) -> str | None:
    """When a running process started (/proc's start time, in clock ticks since boot); None when it is gone or
    a zombie (killed, not yet reaped)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()  # noqa: SIM115 (one read)
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] == "Z":
        return None
    return fields[19]


def _read(lease_uri: str) -> dict | None:
    body = read_small_object(lease_uri)
    if body is None:
        return None
    try:
        lease = json.loads(body)
    except ValueError:
        return None  # unreadable: vouches for nobody
    return lease if isinstance(lease, dict) else None


def _write(lease_uri: str, lease: dict) -> None:
    write_small_object(lease_uri, json.dumps(lease).encode("utf-8"))


def _remove(lease_uri: str) -> None:
    with s3_session(lease_uri) as (target, client):
        with_retries(lambda: client.remove_object(target.bucket, target.key), what=f"remove {target}")

"""What uploads and downloads share: the parallel runner, the progress meter, part sizes, object stats."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # minio itself is imported only where S3 is used (storage.client)
    from minio import Minio

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 32 * MiB  # multipart part and download range size; memory ~ 2 x workers x this
DEFAULT_MAX_WORKERS = 8
SHA256_META = "sha256"  # stored as x-amz-meta-sha256 on every object this package writes
_MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
_MAX_PARTS = 10_000

T = TypeVar("T")


def run_parallel(tasks: Sequence[Callable[[], T]], max_workers: int) -> list[T]:
    """Run tasks on a thread pool; on the first failure cancel what has not started and raise it
    once the running ones have stopped (so nothing writes after we return)."""
    if not tasks:
        return []
    with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="storage") as pool:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0].exception()  # type: ignore[misc]
    return [f.result() for f in futures]


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Thread-safe counters, logged for people at most every `interval` seconds."""

    def __init__(self, verb: str, files: int, total_bytes: int, interval: float = 2.0):
        self.verb, self.files, self.total_bytes, self.interval = verb, files, total_bytes, interval
        self.done_files = 0
        self.done_bytes = 0
        self.started = time.monotonic()
        self._last_log = self.started
        self._lock = threading.Lock()

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files
            now = time.monotonic()
            if now - self._last_log >= self.interval and self.done_files < self.files:
                self._last_log = now
                log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"{self.verb} {self.done_files}/{self.files} files, {human(self.done_bytes)} of "
            f"{human(self.total_bytes)}, {human(self.done_bytes / elapsed)}/s"
        )


def part_size_for(size: int, part_size: int) -> int:
    """At least S3's 5 MiB, and large enough that `size` fits in 10,000 parts."""
    needed = math.ceil(size / _MAX_PARTS / MiB) * MiB
    return max(part_size, needed, _MIN_PART_SIZE)


def stat_or_none(client: Minio, bucket: str, key: str) -> Any | None:
    from minio.error import S3Error  # lazy: see storage.client's imports

    try:
        return client.stat_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return None
        raise


def meta_sha256(stat: Any) -> str | None:
    """The sha256 this package recorded on an object; None for objects written by other tools."""
    return (stat.metadata or {}).get(f"x-amz-meta-{SHA256_META}")

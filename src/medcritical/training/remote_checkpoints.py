"""Checkpoints that outlive the pod: copied to S3 as they are saved, and fetched back by a restarted pod.

A training step whose output is an ``s3://`` URI writes into a local scratch folder (the runner's work
folder, an emptyDir in a Kubernetes Job) and publishes it only at the end; its checkpoints never leave the
machine. A preempted pod would restart from step 0. With a remote checkpoints folder
(``<output URI>/checkpoints/``):

- every saved ``checkpoint-N`` is uploaded to ``<output>/checkpoints/checkpoint-N/`` by global rank 0
  (``CheckpointUploader``), files first and the folder's ``_MANIFEST.json`` last: a folder without one is
  an upload that was cut off and is never resumed;
- the remote folder keeps the checkpoints the trainer keeps locally (its rotation already applied
  ``save_total_limit`` and kept the best one): the others are deleted after each upload;
- the run's fingerprint (recipe section, seed, data and base weights) lies beside them, as
  ``<output>/checkpoints/fingerprint.json``: checkpoints of other inputs are never resumed;
- at the start, when the local folder holds no complete checkpoint, the newest complete remote one is
  downloaded (``restore_checkpoint``) and training resumes from it.

On several nodes, the trainer rotates checkpoints on global rank 0's disk only; `RotateOnEveryNode` applies
the same rotation on the other nodes' disks, where each save leaves its ranks' files (ZeRO partitions).

Not covered: uploading the checkpoints of DeepSpeed ZeRO on several nodes with node-local disks. Each node
saves its ranks' optimizer (and, with ZeRO-3, weight) partitions on its own disk; rank 0's folder alone
cannot be resumed, so nothing is uploaded (``remote_checkpoints_uri`` says so in the log). Such runs keep
their work folder on a shared claim (MEDCRITICAL_WORKDIR on a ReadWriteMany volume), where a restarted pod
finds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medcritical import storage
from medcritical.io.fingerprint import FINGERPRINT_FILE, ResumeMismatch, canonical, describe_changes
from medcritical.io.ranks import is_main_process
from medcritical.storage.folders import (
    is_complete_folder,
    list_folders,
    read_small_object,
    remove_folder,
    write_small_object,
)
from medcritical.training.common import CHECKPOINT_PREFIX, find_resumable_checkpoint, newest_checkpoints_first

log = logging.getLogger(__name__)

# A download lands here first and is renamed to checkpoint-N when whole: a pod killed while downloading
# must not leave a folder that looks resumable (its trainer_state.json may already be in place).
_DOWNLOADING_PREFIX = ".downloading-"


def node_count() -> int:
    """How many nodes this distributed run spans (torchrun sets WORLD_SIZE and LOCAL_WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return max(1, world // max(1, local))


def remote_checkpoints_uri(output_uri: str | None, *, deepspeed: bool) -> str | None:
    """Where this run keeps its checkpoints in S3 (`<output_uri>/checkpoints`), or None: a local output
    (its checkpoints are already where a rerun finds them), or a case that cannot be resumed from S3."""
    if not output_uri or not storage.is_s3(output_uri):
        return None
    if deepspeed and node_count() > 1:
        if is_main_process():
            log.warning(
                "checkpoints are not uploaded to %s/checkpoints: DeepSpeed on %d nodes saves each node's "
                "partitions on that node's disk, and rank 0's folder alone cannot be resumed. A restarted run "
                "resumes only when MEDCRITICAL_WORKDIR is a volume every node shares (see docs/training.md)",
                output_uri.rstrip("/"),
                node_count(),
            )
        return None
    return f"{output_uri.rstrip('/')}/checkpoints"


def remote_checkpoints(checkpoints_uri: str) -> list[str]:
    """The `checkpoint-N` folders under `checkpoints_uri`, complete or not, newest (highest N) first."""
    return newest_checkpoints_first(list_folders(checkpoints_uri))


# ---------------------------------------------------------------------------------------------
# At the start: fetch the newest complete remote checkpoint


def restore_checkpoint(
    checkpoints_uri: str, checkpoints_dir: str | Path, fingerprint: dict[str, Any], *, restart: bool = False
) -> str | None:
    """The checkpoint to resume from: the newest complete one in `checkpoints_dir`, or, when there is none (a new
    pod), the newest complete remote one, downloaded there; None when there is nothing to resume.

    The remote checkpoints must come from the same `fingerprint` (settings, seed, data, base weights): otherwise
    ResumeMismatch names what changed, or, with `restart`, they are deleted and the run starts over.

    Under torchrun, call it once every rank has checked the local folder (check_training_resume) and in each
    machine's first process before the others (TrainingArguments.main_process_first(local=True)): the others
    then find the checkpoint on disk.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if local := find_resumable_checkpoint(checkpoints_dir):
        return local  # this machine's own checkpoints (or the ones its first process fetched) come first
    names = remote_checkpoints(checkpoints_uri)
    if not names:
        return None
    if not _same_run(checkpoints_uri, fingerprint, restart=restart):
        return None
    for name in names:
        if is_complete_folder(f"{checkpoints_uri}/{name}"):
            best = _best_checkpoint(checkpoints_uri, name)
            wanted = [best, name] if best in names and best != name else [name]
            return _download(checkpoints_uri, wanted, checkpoints_dir)
        log.warning(
            "%s/%s is incomplete (no %s: its upload was cut off); skipped", checkpoints_uri, name, storage.MANIFEST_NAME
        )
    return None


def fetch_checkpoint(args, checkpoints_uri: str, fingerprint: dict[str, Any], *, restart: bool = False) -> str | None:
    """`restore_checkpoint` into the trainer's checkpoints folder (`args.output_dir`), in each machine's first
    process before the others. Entering main_process_first starts the process group, a rendezvous: every rank
    has checked the local folder by then, so a download cannot be mistaken for unrecorded results."""
    with args.main_process_first(local=True, desc="fetching the newest uploaded checkpoint"):
        return restore_checkpoint(checkpoints_uri, args.output_dir, fingerprint, restart=restart)


def _same_run(checkpoints_uri: str, fingerprint: dict[str, Any], *, restart: bool) -> bool:
    """Whether the remote checkpoints were made from `fingerprint`; a mismatch is refused, or with `restart`
    the remote checkpoints are deleted (by the main process) and False returned."""
    body = read_small_object(f"{checkpoints_uri}/{FINGERPRINT_FILE}")
    try:
        before = json.loads(body) if body is not None else None
    except ValueError:
        before = {"(unreadable fingerprint.json)": True}
    current = canonical(fingerprint)
    if before == current:
        return True
    if restart:
        if is_main_process():
            log.warning("%s/: --restart: discarding the checkpoints there (other inputs or settings)", checkpoints_uri)
            for name in remote_checkpoints(checkpoints_uri):
                remove_folder(f"{checkpoints_uri}/{name}")
        return False
    if before is None:
        what = f"no {FINGERPRINT_FILE} says what made them"
    else:
        changes = describe_changes(before, current)
        what = "made from other inputs or settings: " + "; ".join(changes[:6])
    raise ResumeMismatch(
        f"{checkpoints_uri}/: holds checkpoints of another run ({what}); rerun with --restart to discard them and "
        "start over, or use another output URI"
    )


def _best_checkpoint(checkpoints_uri: str, name: str) -> str | None:
    """The checkpoint the trainer records as the best so far (DPO's restore_best loads it at the end), if any
    and complete: it comes along, or the run would end on the last weights instead of the best."""
    body = read_small_object(f"{checkpoints_uri}/{name}/trainer_state.json")
    best = json.loads(body).get("best_model_checkpoint") if body else None
    best = Path(best).name if best else None
    return best if best and is_complete_folder(f"{checkpoints_uri}/{best}") else None


def _download(checkpoints_uri: str, names: list[str], checkpoints_dir: Path) -> str:
    """Download the `names` folders, the newest last, and return its local path. The trainer's rotation takes the
    folder written last (newest mtime) for the newest checkpoint. Each lands under a temporary name (kept if
    killed: the next try skips the files already intact) and is renamed into place once all are there."""
    started = time.perf_counter()
    for name in names:
        storage.download(f"{checkpoints_uri}/{name}", checkpoints_dir / (_DOWNLOADING_PREFIX + name))
    for name in names:
        dest = checkpoints_dir / name
        if dest.exists():  # an incomplete local folder of the same step (killed while saving)
            shutil.rmtree(dest)
        (checkpoints_dir / (_DOWNLOADING_PREFIX + name)).rename(dest)
    log.info(
        "downloaded %s to %s in %.1f s; training resumes from %s",
        ", ".join(f"{checkpoints_uri}/{n}" for n in names),
        checkpoints_dir,
        time.perf_counter() - started,
        names[-1],
    )
    return str(checkpoints_dir / names[-1])


# ---------------------------------------------------------------------------------------------
# While training: upload each checkpoint, keep what the trainer keeps


def checkpoint_callbacks(checkpoints_uri: str | None, fingerprint: dict[str, Any]) -> list[TrainerCallback]:
    """The trainer callbacks that keep checkpoints where a restarted run finds them, and no more of them:
    the upload to `checkpoints_uri` (when there is one) and, on several nodes, the rotation on every node."""
    callbacks: list[TrainerCallback] = [CheckpointUploader(checkpoints_uri, fingerprint)] if checkpoints_uri else []
    return callbacks + ([RotateOnEveryNode()] if node_count() > 1 else [])


class CheckpointUploader(TrainerCallback):
    """Uploads each saved checkpoint to `checkpoints_uri` (global rank 0 only), with the run's fingerprint
    beside them, and deletes the remote checkpoints the trainer no longer keeps locally.

    A failed upload (S3 down even after the retries) is logged, not raised: training goes on, and a restarted
    pod resumes from the last checkpoint that did reach S3. The step's final publish reports the outage.
    """

    def __init__(self, checkpoints_uri: str, fingerprint: dict[str, Any]):
        self.checkpoints_uri = checkpoints_uri
        self.fingerprint = canonical(fingerprint)
        self.fingerprint_written = False

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes files of its own into the checkpoint (RNG state, ZeRO partitions): all must be
        # done before rank 0 reads the folder.
        _wait_for_every_rank()
        if state.is_world_process_zero:
            self.upload(Path(args.output_dir), state.global_step)
        return control

    def upload(self, checkpoints_dir: Path, step: int) -> None:
        name = f"{CHECKPOINT_PREFIX}{step}"
        target = f"{self.checkpoints_uri}/{name}"
        started = time.perf_counter()
        try:
            if not self.fingerprint_written:  # before any checkpoint: no complete checkpoint without it
                body = json.dumps(self.fingerprint, indent=2, ensure_ascii=False, sort_keys=True).encode()
                write_small_object(f"{self.checkpoints_uri}/{FINGERPRINT_FILE}", body)
                self.fingerprint_written = True
            storage.upload(checkpoints_dir / name, target)
            kept = {p.name for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()}
            removed = [n for n in remote_checkpoints(self.checkpoints_uri) if n not in kept]
            for old in removed:
                remove_folder(f"{self.checkpoints_uri}/{old}")
        except storage.StorageError as e:
            log.error(
                "%s was not uploaded (%s); training goes on, and a restarted pod would resume from the last "
                "checkpoint that reached %s/",
                name,
                e,
                self.checkpoints_uri,
            )
            return
        log.info(
            "%s uploaded to %s in %.1f s%s",
            name,
            target,
            time.perf_counter() - started,
            f"; removed {', '.join(removed)} there (the trainer no longer keeps it)" if removed else "",
        )


def _wait_for_every_rank() -> None:
    import torch.distributed as dist  # lazy: torch is loaded by then, this only names it

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Multi-node: the other nodes' disks


class RotateOnEveryNode(TrainerCallback):
    """Applies the trainer's checkpoint rotation on the other nodes' own disks too.

    The trainer rotates (save_total_limit) where it writes trainer_state.json: on global rank 0 only, unless
    save_on_each_node. On node-local disks every other node still gets each checkpoint's files of its own ranks
    (ZeRO partitions, RNG states, ~43 GiB per save at 7B) and would keep all of them. After each save, the first
    process of every other node rotates its disk with the same rule, unless the checkpoint's trainer_state.json
    is visible there: then the disk is shared with rank 0, which rotates it.
    """

    def on_save(self, args, state, control, **kwargs):
        _wait_for_every_rank()  # rank 0 has written trainer_state.json, if it writes where this node can see
        if args.save_on_each_node or state.is_world_process_zero or not state.is_local_process_zero:
            return control
        from transformers.trainer_utils import rotate_checkpoints  # lazy: only other nodes' first process rotates

        checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if (checkpoint / "trainer_state.json").is_file():
            return control  # a disk shared with rank 0
        before = {p.name for p in Path(args.output_dir).glob(f"{CHECKPOINT_PREFIX}*")}
        rotate_checkpoints(
            output_dir=args.output_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
        removed = before - {p.name for p in Path(args.output_dir).glob(f"{CHECKPOINT_PREFIX}*")}
        if removed:
            log.info(
                "this node's disk: removed %s (save_total_limit %s)", ", ".join(sorted(removed)), args.save_total_limit
            )
        return control

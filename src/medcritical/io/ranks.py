"""Whether this is the main process of a distributed run (torchrun, or the Kubernetes training operators), from
the environment they set; a plain process is rank 0 of a world of one."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of the whole job: the one that publishes, locks and writes shared files (before a
    trainer exists; afterwards trainer.is_world_process_zero() says the same)."""
    return int(os.environ.get("RANK", "0")) == 0

"""Fault-injection points at the stage boundaries of a run, for crash-recovery tests.

Setting LETHE_FAULT_AT to a boundary name makes the process kill itself with SIGKILL
when it reaches that boundary: no cleanup, no exception handlers, as in a power cut.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("lethe.faults")

BOUNDARIES = (
    "after_ingest", "after_purge", "after_unlearn", "after_commit",
    "after_register", "after_retire", "before_acknowledge",
)


def checkpoint(boundary: str) -> None:
    """Kill this process now if LETHE_FAULT_AT names this boundary."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"Unknown fault boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}.")
    if os.environ.get("LETHE_FAULT_AT") == boundary:
        log.warning("Fault injection: killing pid %d at %s", os.getpid(), boundary)
        for handler in logging.getLogger("lethe").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

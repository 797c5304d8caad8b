"""Recovery of batches that a killed run left behind, before a new batch opens.

Before commit the data version was never published, so the batch is rolled back and
its requests return to pending. After commit the erasure is permanent, so the batch
is driven forward through the remaining stages from what the ledger recorded.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from tasks import versioning
from tasks.context import RunContext, roll_back_batch
from tasks.finish import finish_batch
from tasks.ledger import Batch, BatchState
from tasks.publish import committed_rev, set_batch
from tasks.sources import QueueSource

log = logging.getLogger("lethe.recovery")


def unfinished_batches(ctx: RunContext) -> list[Batch]:
    states = [s for s in BatchState if s.before_commit or s.after_commit]
    with ctx.ledger.session() as s:
        return list(s.scalars(select(Batch).where(Batch.state.in_(states)).order_by(Batch.started_at)))


def recover_interrupted(ctx: RunContext, sources: list[QueueSource], timer) -> dict[str, str]:
    """Roll back or finish every unfinished batch; return what happened to each."""
    outcomes = {}
    for batch in unfinished_batches(ctx):
        if batch.state.before_commit:
            rev = committed_rev(ctx, batch.batch_id) if batch.state == BatchState.CANDIDATE else None
            if rev is None:
                roll_back_batch(ctx, batch.batch_id, f"interrupted in state {batch.state.value}; rolled back by the next run")
                outcomes[batch.batch_id] = "rolled back"
                continue
            # Killed between `git commit` and recording it: the commit is the truth.
            set_batch(ctx, batch.batch_id, state=BatchState.COMMITTED, git_rev_after=rev)
        log.info("Recovery: finishing batch %s from state %s", batch.batch_id, ctx.ledger.get_batch(batch.batch_id).state.value)
        if versioning.has_uncommitted_data(ctx.ws):
            # A later, uncommitted purge cannot exist while this batch is unfinished; restore the commit.
            versioning.rollback_data(ctx.ws)
        finish_batch(ctx, batch.batch_id, sources, timer)
        outcomes[batch.batch_id] = "finished"
    return outcomes

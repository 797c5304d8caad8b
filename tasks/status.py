"""Request status: pending, overdue and recently completed requests, and the next scheduled run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from sqlalchemy import select

from tasks.ledger import DeletionRequest, Ledger, RequestState, utcnow

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"
# A run warns about open requests this close to their deadline.
DEADLINE_WARNING = timedelta(days=3)


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    subject_hash: str
    state: str
    received_at: datetime
    deadline: datetime
    completed_at: datetime | None

    @property
    def overdue(self) -> bool:
        return self.completed_at is None and self.deadline < utcnow()


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes even for timezone-aware columns; Lethe stores UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=utcnow().tzinfo)


def _row(request: DeletionRequest) -> RequestRow:
    return RequestRow(request.request_id, request.subject_hash, request.state.value, _aware(request.received_at),
                      _aware(request.deadline), _aware(request.completed_at))


def open_requests(ledger: Ledger) -> list[RequestRow]:
    """Requests not yet closed, oldest deadline first."""
    with ledger.session() as s:
        rows = s.scalars(select(DeletionRequest).where(
            DeletionRequest.state.in_([RequestState.PENDING, RequestState.IN_BATCH])))
        return sorted((_row(r) for r in rows), key=lambda r: r.deadline)


def recently_completed(ledger: Ledger, days: int = 7) -> list[RequestRow]:
    since = utcnow() - timedelta(days=days)
    with ledger.session() as s:
        rows = s.scalars(select(DeletionRequest).where(
            DeletionRequest.state.in_([RequestState.COMPLETED, RequestState.NO_DATA_HELD])))
        return sorted((r for r in map(_row, rows) if r.completed_at and r.completed_at >= since),
                      key=lambda r: r.completed_at, reverse=True)


def near_deadline(ledger: Ledger, within: timedelta = DEADLINE_WARNING) -> list[RequestRow]:
    """Open requests whose deadline is past or closer than `within`."""
    limit = utcnow() + within
    return [r for r in open_requests(ledger) if r.deadline <= limit]


def next_scheduled_run(deployment: str = "nightly") -> tuple[datetime | None, str]:
    """Return the next run time and where it came from: the Prefect server if one is configured, else prefect.yaml."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                limit=20,
            )
        times = sorted(r.next_scheduled_start_time or r.expected_start_time for r in runs if r.expected_start_time)
        return (times[0] if times else None), "Prefect server"

    from prefect.server.schemas.schedules import CronSchedule
    from prefect.utilities.asyncutils import run_coro_as_sync

    config = yaml.safe_load(PREFECT_YAML.read_text())
    for item in config.get("deployments", []):
        if item.get("name") == deployment:
            for schedule in item.get("schedules") or []:
                cron = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone", "UTC"))
                return run_coro_as_sync(cron.get_dates(n=1))[0], f"cron {schedule['cron']} {schedule.get('timezone', 'UTC')} in prefect.yaml"
    return None, "no schedule in prefect.yaml"

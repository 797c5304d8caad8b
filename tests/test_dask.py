"""SISA shard retrains on a Dask LocalCluster through prefect-dask's DaskTaskRunner, inside the nightly flow."""

from __future__ import annotations

import pytest
import torch

from flows.nightly import nightly_deletion_run
from models.families import train_family
from tasks import registry
from tasks.modeling import family_config, splits_of, train_config
from tasks.settings import ModelSettings, SisaSettings, WorkspaceSettings
from tasks.shards import read_all
from tests.helpers import request, train_subjects, write_requests

MODEL = WorkspaceSettings().model_name
CPU = torch.device("cpu")


@pytest.fixture
def sisa_workspace(tmp_path):
    from tasks.bootstrap import bootstrap
    from tasks.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    model = ModelSettings(family="sisa-mlp", sisa=SisaSettings(n_slices=3, epochs_per_slice=2))
    bootstrap(ws, WorkspaceSettings(model=model, train={"max_epochs": 8, "patience": 3}))
    return ws


def shard_task_runs(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-shard")),
        )


@pytest.mark.usefixtures("prefect_harness")
def test_sisa_shards_run_on_dask(sisa_workspace, monkeypatch):
    ws = sisa_workspace
    monkeypatch.setenv("LETHE_DASK_CLUSTER", "local")
    monkeypatch.setenv("LETHE_DASK_WORKERS", "2")
    write_requests(ws, "dask.jsonl", [request(f"d-{i}", s) for i, s in enumerate(train_subjects(ws, 3, offset=20))])

    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["status"] == "completed"
    assert summary["method"] == "sisa"
    runs = shard_task_runs(registry.version_tags(ws, MODEL, "2")["prefect_flow_run_id"])
    assert runs, "no train-shard task run was recorded"
    assert all(run.state.is_completed() for run in runs)
    assert 1 <= len(runs) <= 3

    # Every stage seeds itself from (seed, shard, stage), so the ensemble trained on the
    # cluster's worker processes equals one trained from scratch here, bit for bit, on the CPU.
    unlearned = registry.load_version(ws, MODEL, "2")
    settings = WorkspaceSettings.load(ws.root)
    splits = splits_of(read_all(ws.data_dir), settings.data.n_shards)
    scratch, _ = train_family(family_config(settings), splits["train"], splits["val"], train_config(settings.train), CPU)
    for (name, left), (_, right) in zip(unlearned.state_dict().items(), scratch.state_dict().items(), strict=True):
        assert torch.equal(left, right), name

"""Run the per-shard work of SISA on a Dask cluster through prefect-dask's DaskTaskRunner.

`LETHE_DASK_CLUSTER` picks where the shard jobs run. Unset, they run one after another
in the flow's process. `local` starts a `distributed.LocalCluster` of
`LETHE_DASK_WORKERS` worker processes for the duration of the unlearning step. Any
other value is the address of a running Dask scheduler (`tcp://scheduler:8786`). Each
job is a Prefect task run, so the Prefect UI shows one `train-shard` run per retrained
constituent. A job carries features, labels and slice numbers, never subject ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

log = logging.getLogger("lethe.shards")

LOCAL = "local"


@task(name="train-shard", cache_policy=NO_CACHE, persist_result=False)
def train_shard_task(function: Callable, job, device):
    """Train one SISA constituent from its checkpoint on a Dask worker."""
    return function(job, device)


def task_runner(cluster: str, workers: int):
    """Build the DaskTaskRunner for a cluster setting: `local` or a scheduler address."""
    from prefect_dask import DaskTaskRunner

    if cluster == LOCAL:
        # One thread per worker process: the constituents are small, so processes parallelise better than threads.
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "host": "127.0.0.1",
        })
    return DaskTaskRunner(address=cluster)


def shard_map(cluster: str | None, workers: int):
    """Return a `map_shards` function for models.sisa that submits each job to Dask, or None to run them in process."""
    if not cluster:
        return None

    def map_shards(function, jobs, device):
        if not jobs:
            return []
        log.info("Shards: submitting %d constituent jobs to Dask (%s)", len(jobs), cluster)
        with task_runner(cluster, workers) as runner:
            futures = [runner.submit(train_shard_task, parameters={"function": function, "job": job, "device": device})
                       for job in jobs]
            results = [future.result() for future in futures]
        log.info("Shards: %d constituent jobs finished", len(results))
        return results

    return map_shards

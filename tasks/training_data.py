"""The input dataset of a model version's run: the DVC data version it trained on, without its rows.

MLflow shows a run's input datasets on the run page. Lethe logs a metadata-only dataset:
its digest is the DVC directory md5, and its source names the git revision, the data path
and the DVC remote. With it, the UI links a model version to its exact data version,
while MLflow stores no record of the data.
"""

from __future__ import annotations

import functools

from tasks.registry import client
from tasks.workspace import Workspace

DATASET_CONTEXT = "training"


@functools.cache
def _dvc_source_class():
    """Define the MLflow dataset source of a DVC data version, importing MLflow only when first needed."""
    from mlflow.data.dataset_source import DatasetSource

    class DvcDatasetSource(DatasetSource):
        """A DVC-tracked directory at one git revision: where the training data came from, not the data."""

        def __init__(self, repository: str, rev: str, path: str, remote: str | None):
            self.repository, self.rev, self.path, self.remote = repository, rev, path, remote

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self, **kwargs):
            raise NotImplementedError(f"Fetch the data with `dvc pull` at git revision {self.rev} of {self.repository}.")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError("DVC sources are created by Lethe, not resolved from a raw source.")

        def to_dict(self) -> dict:
            return {"repository": self.repository, "rev": self.rev, "path": self.path, "remote": self.remote}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(**source_dict)

    return DvcDatasetSource


def dvc_remote_url(ws: Workspace) -> str | None:
    """Return the URL of the workspace's default DVC remote, or None when none is configured."""
    from tasks.versioning import open_dvc

    with open_dvc(ws) as repo:
        name = repo.config["core"].get("remote")
        return repo.config["remote"].get(name, {}).get("url") if name else None


def training_dataset(ws: Workspace, model_name: str, data_md5: str, git_rev: str):
    """Describe a DVC data version as an MLflow dataset: its md5 as digest, no rows and no values."""
    from mlflow.data.meta_dataset import MetaDataset

    source = _dvc_source_class()(repository=ws.root.as_uri(), rev=git_rev, path=ws.data_dir.name,
                                 remote=dvc_remote_url(ws))
    return MetaDataset(source, name=f"{model_name}-training-data", digest=data_md5)


def log_training_data(ws: Workspace, model_name: str, run_id: str, data_md5: str, git_rev: str) -> None:
    """Log the DVC data version as the run's input dataset. MLflow skips an input that is already logged."""
    from mlflow.entities import DatasetInput, InputTag

    dataset = training_dataset(ws, model_name, data_md5, git_rev)
    client(ws).log_inputs(run_id, datasets=[
        DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", DATASET_CONTEXT)]),
    ])

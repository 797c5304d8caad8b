"""Paths of a Lethe workspace: one git + DVC repository with its stores beside it.

    <root>/lethe.json        settings (git)
    <root>/data.dvc          DVC pointer to data/ (git)
    <root>/data/             sharded Parquet (DVC)
    <root>/state/            git-ignored: ledger, MLflow store, DVC remote, secrets, logs
    <root>/queue/            git-ignored: incoming/, quarantine/, done/ deletion requests
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.errors import WorkspaceError
from tasks.settings import SETTINGS_FILE, EnvironmentSettings

DEFAULT_WORKSPACE = Path.home() / ".local" / "share" / "lethe" / "workspace"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def dvc_file(self) -> Path:
        return self.root / "data.dvc"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.db"

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.ledger_path}"

    @property
    def ledger_id_file(self) -> Path:
        """The id of the ledger this workspace was created with, checked whenever a command opens the ledger."""
        return self.state_dir / "ledger-id"

    @property
    def mlflow_db(self) -> Path:
        return self.state_dir / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        """MLflow tracking and registry URI: LETHE_MLFLOW_TRACKING_URI when set, else the workspace's SQLite store."""
        return EnvironmentSettings().mlflow_tracking_uri or f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def dvc_remote_dir(self) -> Path:
        return self.state_dir / "dvc-remote"

    @property
    def dvc_cache_dir(self) -> Path:
        return self.root / ".dvc" / "cache"

    @property
    def hmac_key_file(self) -> Path:
        return self.state_dir / "secrets" / "hmac.key"

    @property
    def signing_key_file(self) -> Path:
        return self.state_dir / "secrets" / "signing.key"

    @property
    def certificates_dir(self) -> Path:
        return self.state_dir / "certificates"

    @property
    def seals_dir(self) -> Path:
        return self.state_dir / "seals"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / "lethe.log"

    @property
    def prefect_home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def incoming_dir(self) -> Path:
        return self.queue_dir / "incoming"

    @property
    def quarantine_dir(self) -> Path:
        return self.queue_dir / "quarantine"

    @property
    def done_dir(self) -> Path:
        return self.queue_dir / "done"

    def make_dirs(self) -> None:
        for path in (self.state_dir, self.artifacts_dir, self.dvc_remote_dir, self.log_file.parent,
                     self.incoming_dir, self.quarantine_dir, self.done_dir):
            path.mkdir(parents=True, exist_ok=True)

    def require(self) -> "Workspace":
        """Return self if the workspace was initialised, else raise with the command that creates it."""
        if not (self.root / SETTINGS_FILE).exists() or not self.dvc_file.exists():
            raise WorkspaceError(
                f"{self.root} is not an initialised Lethe workspace. Create it with `lethe init --workspace {self.root}`."
            )
        return self


def resolve_workspace(path: str | Path | None) -> Workspace:
    """Pick the workspace from the argument, LETHE_WORKSPACE, or the per-user default."""
    if path is None:
        path = EnvironmentSettings().workspace or DEFAULT_WORKSPACE
    return Workspace(Path(path).expanduser().resolve())

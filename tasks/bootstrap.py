"""Create a workspace and its version-1 champion: data, DVC, ledger, MLflow registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tasks import registry, versioning
from tasks.errors import WorkspaceError
from tasks.certificate import generate_key_file as generate_signing_key
from tasks.hashing import generate_key_file, load_hasher
from tasks.ledger import Ledger
from tasks.modeling import family_config, splits_of, train_config, utility_metrics
from tasks.settings import EnvironmentSettings, WorkspaceSettings
from tasks.shards import materialize, read_all
from tasks.workspace import Workspace

log = logging.getLogger("lethe.bootstrap")


@dataclass(frozen=True)
class BootstrapResult:
    rows: int
    data_md5: str
    git_rev: str
    model_version: str
    metrics: dict[str, float]


def create_workspace(ws: Workspace, settings: WorkspaceSettings) -> None:
    """Lay out a new workspace, rejecting a directory that already contains files."""
    if ws.root.exists() and not ws.root.is_dir():
        raise WorkspaceError(f"{ws.root} is a file, not a directory. Pick a new directory for the workspace.")
    if ws.root.exists() and any(ws.root.iterdir()):
        raise WorkspaceError(f"{ws.root} exists and is not empty. Pick a new directory or remove it first.")
    versioning.configured_s3_remote()  # rejects an invalid LETHE_DVC_REMOTE_URL before anything is written
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.make_dirs()
    versioning.init_repository(ws)
    environment = EnvironmentSettings()
    if environment.hmac_key:
        load_hasher(environment.hmac_key, ws.hmac_key_file)  # validates it before anything is written
        log.info("Using the HMAC key from LETHE_HMAC_KEY; no key file is written")
    else:
        generate_key_file(ws.hmac_key_file)
        log.warning(
            "Generated a demo HMAC key at %s. Production must set LETHE_HMAC_KEY from a secret store: "
            "whoever holds the key can test guesses of subject ids against the ledger.", ws.hmac_key_file,
        )
    generate_signing_key(ws.signing_key_file)
    log.warning(
        "Generated a demo Ed25519 signing key for erasure certificates at %s. Production must set "
        "LETHE_SIGNING_KEY or LETHE_SIGNING_KEY_BLOCK and keep the key out of the workspace.", ws.signing_key_file,
    )
    settings.save(ws.root)
    ledger = Ledger(environment.ledger_url or ws.ledger_url)
    ws.ledger_id_file.write_text(ledger.assign_id() + "\n")
    ledger.dispose()


def commit_initial_data(ws: Workspace, settings: WorkspaceSettings) -> tuple[int, str, str]:
    rows = materialize(ws.data_dir, settings.data)
    md5 = versioning.add_data(ws)
    # state/ and queue/ are git-ignored, so "." stages only the settings, DVC files and data.dvc.
    rev = versioning.commit(
        ws, ["."],
        "Add RAND HIE training data\n\nMaterialized from statsmodels' randhie.csv into sharded Parquet.",
    )
    versioning.push_data(ws)
    log.info("Committed data version %s (%d rows) at %s", md5, rows, rev[:12])
    return rows, md5, rev


def train_and_register_baseline(ws: Workspace, settings: WorkspaceSettings, data_md5: str, git_rev: str) -> tuple[str, dict]:
    """Train the workspace's model family on the training split and register it as version 1."""
    from models.device import pick_device, seed_everything
    from models.families import train_family

    device = pick_device(settings.unlearn.device)
    seed_everything(settings.train.seed)
    splits = splits_of(read_all(ws.data_dir), settings.data.n_shards)
    family = family_config(settings)
    model, summary = train_family(family, splits["train"], splits["val"], train_config(settings.train), device)
    model = model.cpu()
    metrics = utility_metrics(model, splits, "cpu")
    metrics["train_wall_time_s"] = summary["wall_time_s"]
    log.info("Trained the %s baseline in %.1f s: test accuracy %.4f", family.name, summary["wall_time_s"], metrics["test_accuracy"])

    candidate = registry.log_candidate(
        ws, settings.model_name, model, run_name="baseline",
        params={"method": "baseline", "model_family": family.name, "data_md5": data_md5, "settings": settings.model_dump_json()},
        metrics=metrics, artifacts={"settings.json": settings.model_dump(mode="json"), "training.json": summary},
    )
    version = registry.register(ws, settings.model_name, candidate, {
        "method": "baseline", "model_family": family.name, "parent_version": "", "data_git_rev": git_rev,
        "data_md5": data_md5, "batch_id": "", "request_count": "0", "contains_erased_data": "false", "device": str(device),
    })
    return version, metrics


def bootstrap(ws: Workspace, settings: WorkspaceSettings | None = None) -> BootstrapResult:
    """Run the whole bootstrap: workspace, data version 1, baseline model version 1."""
    settings = settings or WorkspaceSettings()
    create_workspace(ws, settings)
    rows, md5, rev = commit_initial_data(ws, settings)
    version, metrics = train_and_register_baseline(ws, settings, md5, rev)
    return BootstrapResult(rows=rows, data_md5=md5, git_rev=rev, model_version=version, metrics=metrics)

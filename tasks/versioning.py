"""Git and DVC operations on a workspace: data versions, commits, rollback and object deletion."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import yaml

from tasks import remote_store
from tasks.errors import WorkspaceError
from tasks.settings import EnvironmentSettings
from tasks.workspace import Workspace

log = logging.getLogger("lethe.versioning")

GITIGNORE = "/state/\n/queue/\n"
GIT_IDENTITY = ("Lethe", "lethe@localhost")


def git(ws: Workspace, *args: str) -> str:
    """Run git in the workspace and return stdout; raise WorkspaceError with git's message."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": GIT_IDENTITY[0], "GIT_AUTHOR_EMAIL": GIT_IDENTITY[1],
        "GIT_COMMITTER_NAME": GIT_IDENTITY[0], "GIT_COMMITTER_EMAIL": GIT_IDENTITY[1],
    }
    proc = subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)} failed in {ws.root}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _quiet_dvc() -> None:
    # DVC prints "To track the changes with git, run ..." hints at INFO; the pipeline stages itself.
    logging.getLogger("dvc").setLevel(logging.WARNING)
    # No usage reports, also where the DVC command line runs against this workspace.
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def open_dvc(ws: Workspace):
    from dvc.repo import Repo

    _quiet_dvc()
    return Repo(str(ws.root))


def configured_s3_remote() -> remote_store.S3Remote | None:
    """Return the S3 remote that LETHE_DVC_REMOTE_URL names, or None for the workspace directory remote."""
    url = EnvironmentSettings().dvc_remote_url
    return remote_store.parse_s3_url(url) if url else None


def init_repository(ws: Workspace) -> None:
    """Create the git repository with DVC, and the DVC remote: LETHE_DVC_REMOTE_URL, else a directory in state/."""
    from dvc.repo import Repo

    _quiet_dvc()
    s3_remote = configured_s3_remote()  # an invalid URL fails before anything is written
    git(ws, "init", "-q", "-b", "main")
    (ws.root / ".gitignore").write_text(GITIGNORE)
    with Repo.init(str(ws.root)) as repo:
        with repo.config.edit() as conf:
            if s3_remote is None:
                conf["remote"]["workspace"] = {"url": str(ws.dvc_remote_dir)}
                conf["core"]["remote"] = "workspace"
            conf["core"]["analytics"] = False
            conf["core"]["autostage"] = False
        if s3_remote is not None:
            remote_store.add_remote(repo, s3_remote)


def add_data(ws: Workspace) -> str:
    """Snapshot data/ into the DVC cache, rewrite data.dvc, and return the directory md5."""
    with open_dvc(ws) as repo:
        repo.add(str(ws.data_dir))
    return data_md5(ws)


def push_data(ws: Workspace) -> int:
    """Upload the current data version to the DVC remote; return the number of objects sent."""
    with open_dvc(ws) as repo:
        return repo.push(targets=[str(ws.dvc_file)])


def data_md5(ws: Workspace, rev: str | None = None) -> str:
    """Return the directory md5 (`…​.dir`) recorded in data.dvc, at `rev` or in the work tree."""
    text = git(ws, "show", f"{rev}:data.dvc") if rev else ws.dvc_file.read_text()
    return yaml.safe_load(text)["outs"][0]["md5"]


def commit(ws: Workspace, paths: list[str], message: str) -> str:
    git(ws, "add", "--", *paths)
    git(ws, "commit", "-q", "-m", message)
    return head_rev(ws)


def head_rev(ws: Workspace) -> str:
    return git(ws, "rev-parse", "HEAD")


def has_uncommitted_data(ws: Workspace) -> bool:
    return bool(git(ws, "status", "--porcelain", "--", "data.dvc"))


def rollback_data(ws: Workspace) -> None:
    """Restore data.dvc and data/ to the last committed version."""
    git(ws, "checkout", "HEAD", "--", "data.dvc")
    with open_dvc(ws) as repo:
        repo.checkout(targets=[str(ws.dvc_file)], force=True)
    log.info("Rolled data/ back to the committed version %s", data_md5(ws))


def object_path(root: Path, md5: str) -> Path:
    """Location of an object in a DVC 3 cache or local remote."""
    return root / "files" / "md5" / md5[:2] / md5[2:]


def _read_dir_object(ws: Workspace, dir_md5: str) -> bytes:
    """Read a `.dir` object from the cache, else the directory remote, else an S3 remote."""
    for root in (ws.dvc_cache_dir, ws.dvc_remote_dir):
        path = object_path(root, dir_md5)
        if path.exists():
            return path.read_bytes()
    for remote in remote_store.s3_remotes(ws):
        content = remote_store.read_object(remote, dir_md5)
        if content is not None:
            return content
    raise WorkspaceError(f"DVC directory object {dir_md5} is in neither the cache nor a remote.")


def dir_listing(ws: Workspace, dir_md5: str) -> dict[str, str]:
    """Map relpath -> md5 for the files of one data version, from its `.dir` object."""
    return {entry["relpath"]: entry["md5"] for entry in json.loads(_read_dir_object(ws, dir_md5))}


def object_stores(ws: Workspace) -> dict[str, Path]:
    """Return every store of DVC objects: the cache and each configured local remote."""
    return {"cache": ws.dvc_cache_dir, "remote:workspace": ws.dvc_remote_dir}


def delete_object(ws: Workspace, md5: str) -> list[str]:
    """Delete one object from the cache and every remote; return the stores it was removed from.

    DVC has no targeted purge (`dvc gc` drops every old version), so Lethe removes exactly
    the objects that held erased subjects and leaves the rest of history restorable.
    On S3 every version and delete marker of the object is deleted, and the store is named by its URL.
    """
    removed = []
    for store, root in object_stores(ws).items():
        path = object_path(root, md5)
        if path.exists():
            path.chmod(0o600)
            path.unlink()
            removed.append(store)
    for remote in remote_store.s3_remotes(ws):
        if remote_store.purge_object(remote, md5):
            removed.append(remote.url)
    return removed


def committed_objects(ws: Workspace) -> set[str]:
    """Every object md5 that a committed data version references (directory objects included)."""
    referenced: set[str] = set()
    for rev in git(ws, "log", "--format=%H", "--", "data.dvc").split():
        dir_md5 = data_md5(ws, rev)
        referenced.add(dir_md5)
        try:
            referenced |= set(dir_listing(ws, dir_md5).values())
        except WorkspaceError:
            continue  # the listing of a version whose objects were all tombstoned
    return referenced


def delete_orphans(ws: Workspace) -> list[str]:
    """Delete cached objects that no committed data version references.

    A rolled-back purge leaves the new shards of its uncommitted version in the cache.
    Nothing points to them, so a later erasure would never tombstone them, and they may
    hold subjects that a later batch erases. S3 remotes are not listed: Lethe pushes only
    after the git commit, so every object it pushed belongs to a committed version.
    """
    referenced = committed_objects(ws)
    removed = []
    for store, root in object_stores(ws).items():
        base = root / "files" / "md5"
        if not base.exists():
            continue
        for path in base.glob("*/*"):
            md5 = path.parent.name + path.name
            if md5 not in referenced:
                path.chmod(0o600)
                path.unlink()
                removed.append(md5)
                log.info("Deleted orphaned object %s from %s", md5, store)
    return removed

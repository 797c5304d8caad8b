"""Retire lineage: delete the old data objects that held erased subjects and retire old model versions."""

from __future__ import annotations

import logging

from tasks import model_deletion, registry, versioning
from tasks.ledger import Ledger, Tombstone
from tasks.workspace import Workspace

log = logging.getLogger("lethe.retire")


def purge_objects(ws: Workspace, ledger: Ledger, batch_id: str, affected: dict[str, str]) -> list[dict]:
    """Delete each affected shard object from the DVC cache and remotes and record a tombstone.

    Objects still referenced by the current data version are kept: a shard whose
    rewrite produced identical bytes would otherwise lose its only copy. Each tombstone
    is committed right after its object's deletion, so an error at a later object (an
    S3 outage, say) keeps the record of the stores that the earlier deletions emptied.
    """
    current = set(versioning.dir_listing(ws, versioning.data_md5(ws)).values())
    with ledger.session() as s:
        done = {t.object_md5 for t in s.query(Tombstone).filter(Tombstone.batch_id == batch_id)}
    tombstones = []
    for relpath, md5 in sorted(affected.items()):
        if md5 in done:
            # Tombstoned by an interrupted attempt at this batch; delete again in case it died mid-way.
            versioning.delete_object(ws, md5)
            continue
        if md5 in current:
            log.warning("Retire: %s object %s is still in the current version; kept", relpath, md5)
            continue
        stores = versioning.delete_object(ws, md5)
        with ledger.session() as s:
            s.add(Tombstone(batch_id=batch_id, object_md5=md5, relpath=relpath, stores=stores))
        tombstones.append({"relpath": relpath, "md5": md5, "stores": stores})
        log.info("Retire: deleted %s (%s) from %s", relpath, md5, ", ".join(stores) or "nowhere (already gone)")
    return tombstones


def retire_models(ws: Workspace, model_name: str, batch_id: str, new_version: str,
                  policy: str = "archive") -> list[dict]:
    """Retire every version older than `new_version`, which all trained on the erased data.

    The champion alias has already moved to `new_version`. Under `archive` the versions
    stay and are tagged as containing erased data. Under `delete` they are deleted for
    good (see delete_models). Returns one record per version, with version numbers and
    run ids only, for the batch's ledger entry.
    """
    if policy == "delete":
        return delete_models(ws, model_name, batch_id, new_version)
    if policy != "archive":
        raise ConfigurationError(f"LETHE_RETIREMENT_POLICY={policy!r} is not a retirement policy. Use archive or delete.")
    retired = []
    for version in registry.all_versions(ws, model_name):
        if int(version) >= int(new_version):
            continue
        tags = registry.version_tags(ws, model_name, version)
        batches = [b for b in tags.get("erased_by_batches", "").split(",") if b]
        erased_by = ",".join(batches if batch_id in batches else [*batches, batch_id])
        registry.tag_version(ws, model_name, version, {
            "contains_erased_data": "true", "retired": "true",
            "erased_by_batches": erased_by, "superseded_by": new_version,
        })
        retired.append(version)
    log.info("Retire: tagged versions %s of %s as containing erased data", retired, model_name)
    return [{"version": version, "action": "archived"} for version in retired]


def delete_models(ws: Workspace, model_name: str, batch_id: str, new_version: str) -> list[dict]:
    """Permanently delete every version older than `new_version` with its logged models, run and artifacts.

    Each version's deletion record is saved before its first delete, so a run killed
    mid-way leaves a pending record that the next attempt finishes first. Versions that
    still exist are then planned and deleted. Returns the records of the versions this
    batch deleted, including those an interrupted attempt began.
    """
    for record in model_deletion.deletion_records(ws, model_name).values():
        if record.state != "deleted":
            log.warning("Retire: resuming the interrupted deletion of version %s of %s", record.version, model_name)
            model_deletion.complete_deletion(ws, model_name, record)
    for version in registry.all_versions(ws, model_name):
        if int(version) < int(new_version):
            model_deletion.complete_deletion(ws, model_name, model_deletion.plan_version_deletion(ws, model_name, version, batch_id))
    deleted = [r for r in model_deletion.deletion_records(ws, model_name).values() if r.deleted_by_batch == batch_id]
    return [{"version": r.version, "action": "deleted", "run_id": r.run_id, "logged_model_ids": r.logged_model_ids,
             "s3_object_versions_deleted": r.s3_object_versions_deleted}
            for r in sorted(deleted, key=lambda r: int(r.version))]

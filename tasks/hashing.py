"""Keyed hashing of subject ids: the only form in which an id leaves the dataset."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path

from tasks.errors import ConfigurationError

log = logging.getLogger("lethe.hashing")

MIN_KEY_BYTES = 16


class SubjectHasher:
    """HMAC-SHA256 of canonical subject ids under one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"The HMAC key has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                "(for example the output of `python -c 'import secrets; print(secrets.token_hex(32))'`)."
            )
        self._key = key

    def hash(self, subject_id: str) -> str:
        return hmac.new(self._key, subject_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def hash_many(self, subject_ids: Iterable[str]) -> list[str]:
        return [self.hash(s) for s in subject_ids]


def digest_of_hashes(subject_hashes: Iterable[str]) -> str:
    """Return a SHA-256 over the sorted hashed keys: one value that names a set of subjects."""
    joined = "\n".join(sorted(set(subject_hashes))).encode()
    return hashlib.sha256(joined).hexdigest()


def generate_key_file(path: Path) -> None:
    """Write a new random key (hex) readable only by the owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)


def load_hasher(env_key: str | None, key_file: Path) -> SubjectHasher:
    """Build the hasher from LETHE_HMAC_KEY, else from the workspace's demo key file."""
    if env_key:
        try:
            return SubjectHasher(env_key.encode("utf-8"))
        except ConfigurationError as exc:
            raise ConfigurationError(f"LETHE_HMAC_KEY is invalid: {exc}") from None
    if key_file.exists():
        log.debug("Using the workspace HMAC key at %s", key_file)
        return SubjectHasher(key_file.read_text().strip().encode("utf-8"))
    raise ConfigurationError(
        f"No HMAC key: set LETHE_HMAC_KEY or restore {key_file}. "
        "Without the key the ledger's hashed subject ids cannot be matched."
    )

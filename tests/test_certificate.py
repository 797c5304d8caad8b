"""Erasure-certificate signing and the sources of the signing key."""

from __future__ import annotations

import copy

import pytest

from tasks.certificate import generate_key_file, load_signing_key, public_key_hex, sign, verify
from tasks.errors import ConfigurationError

BODY = {"batch_id": "batch-1", "subjects": {"count": 2, "hashed_key_digest": "ab" * 32}, "rows_removed": 7}


@pytest.fixture
def key(tmp_path, monkeypatch):
    monkeypatch.delenv("LETHE_SIGNING_KEY", raising=False)
    monkeypatch.delenv("LETHE_SIGNING_KEY_BLOCK", raising=False)
    path = tmp_path / "signing.key"
    generate_key_file(path)
    return load_signing_key(path)


def test_signature_verifies(key):
    envelope = sign(BODY, key)
    assert verify(envelope, public_key_hex(key)) is None


def test_changed_body_fails(key):
    envelope = sign(BODY, key)
    tampered = copy.deepcopy(envelope)
    tampered["certificate"]["rows_removed"] = 6
    assert verify(tampered, public_key_hex(key)) == "signature does not match the certificate"


def test_other_key_fails(key, tmp_path):
    other_path = tmp_path / "other.key"
    generate_key_file(other_path)
    envelope = sign(BODY, load_signing_key(other_path))
    assert "other than the workspace's" in verify(envelope, public_key_hex(key))


def test_key_file_is_private(tmp_path):
    path = tmp_path / "signing.key"
    generate_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600


def test_env_key_wins(key, tmp_path, monkeypatch):
    monkeypatch.setenv("LETHE_SIGNING_KEY", "11" * 32)
    loaded = load_signing_key(tmp_path / "signing.key")
    assert public_key_hex(loaded) != public_key_hex(key)


@pytest.mark.parametrize(("value", "message"), [("zz" * 32, "not hex"), ("11" * 16, "has 16 bytes")])
def test_invalid_env_key(value, message, tmp_path, monkeypatch):
    monkeypatch.setenv("LETHE_SIGNING_KEY", value)
    with pytest.raises(ConfigurationError, match=message):
        load_signing_key(tmp_path / "missing.key")


def test_missing_key_names_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("LETHE_SIGNING_KEY", raising=False)
    monkeypatch.delenv("LETHE_SIGNING_KEY_BLOCK", raising=False)
    with pytest.raises(ConfigurationError, match="set LETHE_SIGNING_KEY"):
        load_signing_key(tmp_path / "missing.key")


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_secret_block_key(tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("LETHE_SIGNING_KEY", raising=False)
    Secret(value="22" * 32).save("lethe-signing-test", overwrite=True)
    monkeypatch.setenv("LETHE_SIGNING_KEY_BLOCK", "lethe-signing-test")
    from_block = load_signing_key(tmp_path / "missing.key")
    monkeypatch.delenv("LETHE_SIGNING_KEY_BLOCK")
    monkeypatch.setenv("LETHE_SIGNING_KEY", "22" * 32)
    from_env = load_signing_key(tmp_path / "missing.key")
    assert public_key_hex(from_block) == public_key_hex(from_env)

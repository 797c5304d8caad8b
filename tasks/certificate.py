"""Erasure certificates: a signed JSON record of what one batch erased and how.

Signed with Ed25519 over the canonical JSON of the certificate body. The key comes
from LETHE_SIGNING_KEY (hex of the 32-byte private key), a Prefect Secret block named
by LETHE_SIGNING_KEY_BLOCK, or the workspace's demo key file, in that order.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from tasks.chain import canonical
from tasks.errors import ConfigurationError

log = logging.getLogger("lethe.certificate")

ALGORITHM = "Ed25519"
VERSION = 1


def _private_key_from_hex(text: str, origin: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigurationError(f"The signing key from {origin} is not hex; expected 64 hex digits (32 bytes).") from None
    if len(raw) != 32:
        raise ConfigurationError(f"The signing key from {origin} has {len(raw)} bytes; an Ed25519 private key has 32.")
    return Ed25519PrivateKey.from_private_bytes(raw)


def generate_key_file(path: Path) -> None:
    """Write a new Ed25519 private key (hex) readable only by the owner."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw.hex() + "\n")
    path.chmod(0o600)


def load_signing_key(key_file: Path):
    """Return the private key from the environment, a Prefect Secret block, or the key file."""
    if os.environ.get("LETHE_SIGNING_KEY"):
        return _private_key_from_hex(os.environ["LETHE_SIGNING_KEY"], "LETHE_SIGNING_KEY")
    block = os.environ.get("LETHE_SIGNING_KEY_BLOCK")
    if block:
        from prefect.blocks.system import Secret

        # Secret.get() parses JSON, which turns an all-digit hex key into an int; read the raw string.
        raw = Secret.load(block).value.get_secret_value()
        return _private_key_from_hex(str(raw), f"Prefect Secret block {block!r}")
    if key_file.exists():
        return _private_key_from_hex(key_file.read_text(), str(key_file))
    raise ConfigurationError(f"No signing key: set LETHE_SIGNING_KEY or LETHE_SIGNING_KEY_BLOCK, or restore {key_file}.")


def public_key_hex(private_key) -> str:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(body: dict, private_key) -> dict:
    """Wrap a certificate body with its signature and the signer's public key."""
    signature = private_key.sign(canonical(body).encode())
    return {"certificate": body, "algorithm": ALGORITHM, "public_key": public_key_hex(private_key),
            "signature": base64.b64encode(signature).decode()}


def verify(envelope: dict, trusted_public_key_hex: str) -> str | None:
    """Check an envelope against the trusted key; return None when valid, else the reason it is not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if envelope.get("algorithm") != ALGORITHM:
        return f"unsupported algorithm {envelope.get('algorithm')!r}"
    if envelope.get("public_key") != trusted_public_key_hex:
        return "signed by a key other than the workspace's signing key"
    try:
        signature = base64.b64decode(envelope["signature"], validate=True)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(trusted_public_key_hex)).verify(
            signature, canonical(envelope["certificate"]).encode())
    except (InvalidSignature, ValueError, KeyError):
        return "signature does not match the certificate"
    return None

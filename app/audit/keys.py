"""Ed25519 keys for the log's checkpoints: the service's signing key (AUDIT_SIGNING_KEY) and
an auditor's trusted public key, each as a PEM file, a file holding the raw key in base64, or
the raw key in base64 itself."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["InvalidKey", "load_private_key", "load_public_key", "public_key_text"]


class InvalidKey(ValueError):
    """A key that cannot be read."""


def _key_bytes(value: str, what: str) -> bytes:
    """``value``'s key material: the contents of the file it names, or itself."""
    text = value.strip()
    path = Path(text)
    if not path.is_file() and (_is_raw_key(text) or "/" not in text):
        return text.encode()  # base64 holds "/" too: a raw key is never taken for a path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidKey(f"{what}: cannot read {text}: {exc.strerror}") from None


def _is_raw_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _raw(material: bytes, what: str) -> bytes:
    try:
        raw = base64.b64decode(material.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(
            f"{what} must be a PEM file or 32 bytes in base64 (a raw Ed25519 key)"
        ) from None
    if len(raw) != 32:
        raise InvalidKey(f"{what} must be 32 bytes in base64, got {len(raw)} bytes")
    return raw


def load_private_key(value: str) -> Ed25519PrivateKey:
    """AUDIT_SIGNING_KEY: a path to a PEM (PKCS#8) file or to a file holding the base64 raw
    key, or the base64 raw key itself."""
    what = "AUDIT_SIGNING_KEY"
    material = _key_bytes(value, what)
    if material.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(material, password=None)
        except (ValueError, TypeError) as exc:
            raise InvalidKey(f"{what}: not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidKey(f"{what}: the PEM key is not an Ed25519 key")
        return key
    return Ed25519PrivateKey.from_private_bytes(_raw(material, what))


def load_public_key(value: str) -> Ed25519PublicKey:
    """The auditor's trusted key: a PEM file, a file holding the base64 raw key, or the
    base64 raw key itself (as ``GET /audit/checkpoints`` shows it)."""
    what = "the public key"
    material = _key_bytes(value, what)
    if material.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(material)
        except ValueError as exc:
            raise InvalidKey(f"{what}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidKey(f"{what}: the PEM key is not an Ed25519 key")
        return key
    return Ed25519PublicKey.from_public_bytes(_raw(material, what))


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()

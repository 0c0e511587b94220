"""Signed checkpoints: a chain value at a position, signed with the service's Ed25519 key.

A checkpoint vouches for the whole history up to its position (every chain value depends on
every event before it). An auditor who keeps one, and trusts the public key, can later prove
that history was not rewritten, even by someone who could write the database and recompute
every stored chain value: ``audit verify`` recomputes the chain from the events' content and
compares it with the signed value.

The signed bytes are ``activity-log checkpoint`` then the position (decimal), the chain value
(lowercase hex) and the time (RFC 3339 UTC), each on a line of its own, UTF-8, without a
newline at the end. The checkpoints are appended to the log (stream ``audit``, source
``checkpoints``, event ``checkpoint``), each payload a :class:`Checkpoint`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.audit.keys import InvalidKey, public_key_text
from app.audit.verify import Checkpointed
from app.eventlog import EventStore, NewEvent, VersionConflict, canonical_payload
from app.eventlog.tables import events
from app.events import utc_now
from app.runtime.background import Background

__all__ = [
    "CHECKPOINT_EVENT",
    "CHECKPOINT_SOURCE",
    "CHECKPOINT_STREAM",
    "Checkpoint",
    "CheckpointWriter",
    "InvalidCheckpoint",
    "LoggedCheckpoint",
    "parse_checkpoint",
    "read_checkpoints",
    "sign_checkpoint",
    "verified_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_STREAM = "audit"
CHECKPOINT_SOURCE = "checkpoints"
CHECKPOINT_EVENT = "checkpoint"

_PREFIX = "activity-log checkpoint"


class InvalidCheckpoint(InvalidKey):
    """A checkpoint that cannot be read, or whose signature does not verify."""


class Checkpoint(msgspec.Struct, frozen=True):
    position: int
    #: The chain value at ``position``, lowercase hex.
    chain: str
    time: str
    #: Ed25519 signature of :meth:`signed_bytes`, base64.
    signature: str
    #: The signing key's public half (raw, base64): which key to ask the operator about. A
    #: verification uses the key the auditor trusts, never this one.
    public_key: str

    def signed_bytes(self) -> bytes:
        return f"{_PREFIX}\n{self.position}\n{self.chain}\n{self.time}".encode()


class LoggedCheckpoint(Checkpoint, frozen=True):
    """A checkpoint as the log holds it: ``logged_at`` is the position of its own event."""

    logged_at: int = 0


_logged = msgspec.json.Decoder(LoggedCheckpoint)


async def read_checkpoints(engine: AsyncEngine, limit: int) -> list[LoggedCheckpoint]:
    """The newest ``limit`` checkpoints in the log, newest first."""
    query = (
        select(events.c.position, events.c.payload)
        .where(events.c.stream == CHECKPOINT_STREAM, events.c.source_id == CHECKPOINT_SOURCE)
        .order_by(events.c.position.desc())
        .limit(limit)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [
        msgspec.structs.replace(_logged.decode(payload), logged_at=position)
        for position, payload in rows
    ]


def sign_checkpoint(key: Ed25519PrivateKey, position: int, chain: bytes, time: str) -> Checkpoint:
    unsigned = Checkpoint(position, chain.hex(), time, "", public_key_text(key.public_key()))
    signature = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
    return msgspec.structs.replace(unsigned, signature=signature)


def parse_checkpoint(value: str) -> Checkpoint:
    """A checkpoint given as its JSON, or as a file holding it (a checkpoint event's whole
    envelope, as ``GET /audit/checkpoints`` or ``export`` show it, will do too)."""
    text = value.strip()
    if not text.startswith("{"):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidCheckpoint(f"cannot read the checkpoint {value}: {exc.strerror}") from None
    try:
        found = msgspec.json.decode(text)
        if isinstance(found, dict) and isinstance(found.get("payload"), dict):
            found = found["payload"]
        return msgspec.convert(found, Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidCheckpoint(f"not a checkpoint: {exc}") from None


def verified_checkpoint(checkpoint: Checkpoint, key: Ed25519PublicKey) -> Checkpointed:
    """The position and chain value ``checkpoint`` vouches for, once its signature verifies
    with ``key``."""
    try:
        signature = base64.b64decode(checkpoint.signature, validate=True)
        chain = bytes.fromhex(checkpoint.chain)
        key.verify(signature, checkpoint.signed_bytes())
    except (binascii.Error, ValueError, InvalidSignature):
        raise InvalidCheckpoint(
            f"the checkpoint at position {checkpoint.position} is not signed by that key "
            "(or was altered after it was signed)"
        ) from None
    return Checkpointed(checkpoint.position, chain)


class CheckpointWriter:
    """Appends a signed checkpoint of the head every ``interval`` seconds, unless nothing
    but the previous checkpoint was appended since. Of several instances sharing a log, one
    writes each checkpoint (each appends with ``expected_version``)."""

    def __init__(
        self, engine: AsyncEngine, store: EventStore, key: Ed25519PrivateKey, *, interval: float
    ) -> None:
        self._engine = engine
        self._store = store
        self._key = key
        self._interval = interval
        self._task = Background("audit-checkpoints")

    @property
    def public_key(self) -> str:
        return public_key_text(self._key.public_key())

    def start(self) -> None:
        self._task.start(self._loop())

    async def close(self) -> None:
        await self._task.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.write()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("writing an audit checkpoint failed; retrying", exc_info=True)

    async def write(self) -> Checkpoint | None:
        """A checkpoint of the head, appended; None if there was nothing new to sign."""
        async with self._engine.connect() as connection:
            head = (
                await connection.execute(
                    select(events.c.position, events.c.chain)
                    .order_by(events.c.position.desc())
                    .limit(1)
                )
            ).first()
            last = (
                await connection.execute(
                    select(events.c.position, events.c.version)
                    .where(
                        events.c.stream == CHECKPOINT_STREAM,
                        events.c.source_id == CHECKPOINT_SOURCE,
                    )
                    .order_by(events.c.position.desc())
                    .limit(1)
                )
            ).first()
        if head is None or (last is not None and last[0] == head[0]):
            return None
        if head[1] is None:
            logger.warning("no checkpoint: the head has no chain value (AUDIT_CHAIN=0)")
            return None
        checkpoint = sign_checkpoint(self._key, head[0], bytes(head[1]), utc_now())
        try:
            await self._store.append_one(
                NewEvent(
                    CHECKPOINT_STREAM,
                    CHECKPOINT_SOURCE,
                    CHECKPOINT_EVENT,
                    canonical_payload(msgspec.to_builtins(checkpoint)),
                    expected_version=0 if last is None else last[1],
                )
            )
        except VersionConflict:
            return None  # another instance wrote one just now
        return checkpoint

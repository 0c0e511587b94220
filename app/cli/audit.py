"""``audit verify`` and ``audit keygen``: the log's hash chain, recomputed; a signing key."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from app.cli.common import CliError, check_local_database, print_line
from app.config import get_settings

if TYPE_CHECKING:
    from app.audit.verify import Broken, Checkpointed, Verified

__all__ = ["register"]


def _verify(args: argparse.Namespace) -> int:
    from app.audit.checkpoints import parse_checkpoint, verified_checkpoint
    from app.audit.keys import InvalidKey, load_public_key
    from app.audit.verify import Verified

    if args.checkpoint and not args.public_key:
        raise CliError("--checkpoint needs --public-key: the key you trust, not the log's", 2)
    try:
        key = load_public_key(args.public_key) if args.public_key else None
        checkpoints = [
            verified_checkpoint(parse_checkpoint(value), key)
            for value in args.checkpoint
            if key is not None
        ]
    except InvalidKey as exc:
        raise CliError(str(exc)) from None
    outcome = asyncio.run(_recompute(checkpoints))
    print_line(outcome.describe())
    if isinstance(outcome, Verified) and checkpoints:
        print_line(f"{len(checkpoints)} signed checkpoint(s) match the recomputed chain")
    return 0 if isinstance(outcome, Verified) else 1


async def _recompute(checkpoints: list[Checkpointed]) -> Verified | Broken:
    from pathlib import Path

    from app.audit.history import archived_ranges, table_rows
    from app.audit.verify import verify_history
    from app.database import create_engine
    from app.eventlog.archives import list_segments

    settings = get_settings()
    url = settings.database.url
    check_local_database(url)
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            segments = await list_segments(connection)
        directory = Path(settings.retention.archive_dir)
        loop = asyncio.get_running_loop()
        # The recomputation is CPU work: on a thread, with the pages read on this loop.
        return await asyncio.to_thread(
            verify_history,
            table_rows(engine, loop),
            segments=archived_ranges(directory, segments),
            checkpoints=checkpoints,
        )
    finally:
        await engine.dispose()


def _keygen(_: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    from app.audit.keys import public_key_text

    key = Ed25519PrivateKey.generate()
    print_line(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode())
    print_line(f"public key (give it to your auditors): {public_key_text(key.public_key())}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", help="verify the log's hash chain", description="The log's audit trail."
    )
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_commands.add_parser(
        "verify",
        help="recompute the chain over the local log",
        description=(
            "Recompute every event's chain value from its content (DATABASE_URL) and print "
            "'verified N events, head H', or the first position where the chain breaks and "
            "how (exit status 1)."
        ),
    )
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="FILE|JSON",
        help="a signed checkpoint you kept (repeatable): the recomputed chain must meet it",
    )
    verify.add_argument(
        "--public-key",
        metavar="KEY|FILE",
        help="the checkpoints' Ed25519 public key: base64 (as /audit/checkpoints shows it) "
        "or a PEM file",
    )
    verify.set_defaults(handler=_verify)
    keygen = audit_commands.add_parser(
        "keygen",
        help="print a new Ed25519 signing key (PEM) for AUDIT_SIGNING_KEY",
        description="Print a new Ed25519 private key (PEM) and its public key (base64).",
    )
    keygen.set_defaults(handler=_keygen)

"""The command line: ``python -m app COMMAND`` (installed as ``activity`` too).

One module per command group; each registers its parser and keeps its heavy imports inside
its handlers, so that ``--help`` and the HTTP-only commands start fast.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from app.cli import agents, audit, ingest, log, replay, service, tail, transfer
from app.cli.common import CliError, print_error
from app.config import SettingsError

__all__ = ["MODULE_PROG", "build_parser", "main"]


MODULE_PROG = "python -m app"


def build_parser(prog: str = MODULE_PROG) -> argparse.ArgumentParser:
    """The parser; ``prog`` is the program as its usage lines name it."""
    parser = argparse.ArgumentParser(prog=prog, description="Event-sourced activity service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (service, ingest, tail, replay, transfer, agents, audit, log):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = MODULE_PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    # The service commands log as the service does; the others print their own output, and
    # only warnings (and the client's reconnection notices) go to stderr.
    verbose = not getattr(args, "quiet", True)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("app.client").setLevel(logging.INFO)
    # Migrations run on every start; their step-by-step chatter is not news.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code: int = args.handler(args)
    except SettingsError as exc:
        print_error(str(exc))
        return 2
    except CliError as exc:
        print_error(str(exc))
        return exc.code
    return code

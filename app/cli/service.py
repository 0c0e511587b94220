"""``serve``, ``db upgrade`` and ``projections rebuild``."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import logging
import math
import os
import signal
import sys
from typing import Any

from app.cli.common import CliError, content_store_in_use, redacted
from app.config import Settings, get_settings

__all__ = ["load_granian_app", "register"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _serve(args: argparse.Namespace) -> int:
    settings = get_settings()  # fail here, with a clear message, not inside a worker
    if args.workers < 1:
        raise CliError("--workers must be at least 1", code=2)
    if args.workers > 1 and settings.content.surrealdb_url.startswith("surrealkv"):
        # Every worker is an instance of its own; an embedded path has exactly one owner.
        raise CliError(
            f"--workers {args.workers} needs a content store every worker can open: an "
            f"embedded {settings.content.surrealdb_url} has one owner. Set SURREALDB_URL to a "
            "SurrealDB server (ws://…), and DATABASE_URL to PostgreSQL for prompt "
            "cross-worker streams (see docs/scaling.md)",
            code=2,
        )
    # Found here, a content store held by another process is one line; found in the
    # server's start-up, it is a traceback in the server's log. (Two servers started in the
    # same instant can both pass this check: the second then fails in its start-up.)
    from app.content import ContentStore

    with content_store_in_use(code=2):
        ContentStore.check_not_in_use(settings.content)
    server = args.http_server or settings.server.http_server
    if server == "granian":
        _serve_granian(args, settings)
    else:
        _serve_uvicorn(args, settings)
    return 0


def _serve_uvicorn(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from app.server.connections import uvicorn_options

    try:
        bounds = uvicorn_options(settings)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    uvicorn.run(
        "app.asgi:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        log_level=args.log_level,
        **bounds,
        # Request lines come from app.access (app.observability), at this level.
        access_log=False,
        timeout_graceful_shutdown=args.graceful_timeout,
        proxy_headers=False,
    )


def _serve_granian(args: argparse.Namespace, settings: Settings) -> None:
    try:
        from granian.constants import HTTPModes, Interfaces, Loops
        from granian.http import HTTP1Settings
        from granian.log import LogLevels
        from granian.server import Server
    except ImportError:
        raise CliError("--http-server granian needs granian: pip install granian", code=2) from None

    level = args.log_level.upper()
    server = Server(
        "app.asgi:create_app",
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        loop=Loops.uvloop,
        # HTTP/1.1 only, as under uvicorn: SSE needs nothing more, and a plain-text HTTP/2
        # connection would multiplex streams the per-connection limits do not see.
        http=HTTPModes.http1,
        websockets=False,
        http1_settings=HTTP1Settings(
            header_read_timeout=math.ceil(settings.server.header_timeout_seconds * 1000)
        ),
        backlog=2048,
        # Granian holds further requests once this many are in flight in a worker (default:
        # 1024): every SSE subscriber is one, so the cap must sit above the SSE limit, which
        # answers 503 itself.
        backpressure=settings.limits.sse_max_connections + 1024,
        log_level=LogLevels(args.log_level),
        # Granian's lines go through the root logger, in the service's format; no access log
        # (app.access writes the request lines).
        log_dictconfig={
            "loggers": {
                "_granian": {"handlers": [], "propagate": True},
                "granian.access": {"handlers": [], "propagate": True, "level": "WARNING"},
            }
        },
        log_access=False,
        # Streams end at once on SIGTERM (app.api.shutdown); a worker still busy after the
        # graceful timeout and a second more is killed.
        workers_kill_timeout=math.ceil(args.graceful_timeout) + 1,
    )
    loader = functools.partial(load_granian_app, level, os.getpid())
    server.serve(target_loader=loader, wrap_loader=False)


def load_granian_app(access_level: str, supervisor: int) -> Any:
    """The application, built in a granian worker process (``supervisor``: its parent)."""
    _die_with_parent(supervisor)
    # A spawned (not forked) worker starts with logging unconfigured.
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # configure_logging() gives app.access the level of uvicorn's access logger, which is
    # what `serve --log-level` sets under uvicorn.
    logging.getLogger("uvicorn.access").setLevel(access_level)
    from app.asgi import create_app

    return create_app()


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` exits.

    Granian's workers are child processes that outlive a supervisor killed with SIGKILL: the
    orphan would go on serving (and appending) with no one to stop it. Under uvicorn a single
    worker is the server process itself, so ``kill -9`` stops everything; this keeps that true.
    (SIGTERM to the supervisor is unaffected: it stops its workers and waits for them.)
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        logging.getLogger(__name__).warning(
            "cannot tie the worker to its supervisor: %s", os.strerror(ctypes.get_errno())
        )
    elif os.getppid() != parent:  # it exited before the call above
        os._exit(1)


def _db_upgrade(_: argparse.Namespace) -> int:
    from app.database import upgrade_database

    url = get_settings().database.url
    asyncio.run(upgrade_database(url))
    print(f"database is at the latest revision: {redacted(url)}")
    return 0


async def rebuild_projections(
    url: str, names: list[str] | None = None, *, from_archives: bool = False
) -> list[tuple[str, int]]:
    """Rebuild the named projections (default: all), each from its newest snapshot, or from
    position 0 through the archives (``from_archives``); returns (name, position) for each."""
    from pathlib import Path

    from app.database import create_engine, upgrade_database
    from app.eventlog.archives import ArchiveDamaged
    from app.projections import ProjectionRunner, UnknownProjection, all_projections

    await upgrade_database(url)
    engine = create_engine(url, pool_size=2)
    try:
        runner = ProjectionRunner(engine, all_projections())
        try:
            # All at once: one transaction, each read of the log shared by all of them.
            positions = await runner.rebuild_together(
                names or sorted(runner.projections),
                archive_dir=Path(get_settings().retention.archive_dir),
                from_snapshots=not from_archives,
            )
        except UnknownProjection as exc:
            raise CliError(exc.args[0], code=2) from None
        except ArchiveDamaged as exc:
            raise CliError(f"rebuild refused, nothing changed: {exc}") from None
        return sorted(positions.items())
    finally:
        await engine.dispose()


def _projections_rebuild(args: argparse.Namespace) -> int:
    url = get_settings().database.url
    names = [args.name] if args.name else None
    for name, position in asyncio.run(
        rebuild_projections(url, names, from_archives=args.from_archives)
    ):
        print(f"rebuilt {name} up to position {position}")
    return 0


async def _take_snapshots(names: list[str] | None) -> list[Any]:
    from app.database import create_engine, upgrade_database
    from app.projections import ProjectionRunner, UnknownProjection, all_projections
    from app.projections.snapshots import take_snapshot

    settings = get_settings()
    url = settings.database.url
    await upgrade_database(url)
    engine = create_engine(url, pool_size=2)
    try:
        runner = ProjectionRunner(engine, all_projections())
        try:
            chosen = [runner.get(name) for name in names or sorted(runner.projections)]
        except UnknownProjection as exc:
            raise CliError(exc.args[0], code=2) from None
        return [
            await take_snapshot(engine, projection, keep=settings.retention.snapshots_kept)
            for projection in chosen
        ]
    finally:
        await engine.dispose()


def _projections_snapshot(args: argparse.Namespace) -> int:
    for snapshot in asyncio.run(_take_snapshots([args.name] if args.name else None)):
        print(
            f"snapshot of {snapshot.name} at position {snapshot.position} "
            f"({snapshot.row_count} rows)"
        )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve", help="run the HTTP/SSE service", description="Run the HTTP/SSE service."
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--http-server",
        choices=["uvicorn", "granian"],
        default=None,
        help="HTTP server to run the service under (default: HTTP_SERVER, else uvicorn)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default info)",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=float,
        default=5.0,
        help="seconds to let open streams finish on shutdown (default 5)",
    )
    serve.set_defaults(handler=_serve, quiet=False)

    db = commands.add_parser("db", help="database maintenance", description="Database maintenance.")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser(
        "upgrade", help="apply pending migrations", description="Apply pending migrations."
    )
    upgrade.set_defaults(handler=_db_upgrade, quiet=False)

    projections = commands.add_parser(
        "projections", help="read-model maintenance", description="Read-model maintenance."
    )
    projection_commands = projections.add_subparsers(
        dest="projections_command", required=True, metavar="COMMAND"
    )
    rebuild = projection_commands.add_parser(
        "rebuild",
        help="rebuild projections from their newest snapshot (all, or the one named)",
        description="Empty the read models, put back each one's newest snapshot (if any) "
        "and fold every event after it, from the table and, where retention removed events, "
        "from the archive segments under LOG_ARCHIVE_DIR; in one transaction.",
    )
    rebuild.add_argument("name", nargs="?", help="projection name (default: all)")
    rebuild.add_argument(
        "--from-archives",
        action="store_true",
        help="ignore snapshots: fold the whole history from position 0, archives then table "
        "(after a change to how a projection folds)",
    )
    rebuild.set_defaults(handler=_projections_rebuild, quiet=False)
    snapshot = projection_commands.add_parser(
        "snapshot",
        help="snapshot projections now (all, or the one named)",
        description="Store each projection's rows and checkpoint as a snapshot, which "
        "rebuilds start from.",
    )
    snapshot.add_argument("name", nargs="?", help="projection name (default: all)")
    snapshot.set_defaults(handler=_projections_snapshot, quiet=False)

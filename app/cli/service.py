"""``serve``, ``db upgrade`` and ``projections rebuild``."""

from __future__ import annotations

import argparse
import asyncio

from app.cli.common import CliError, redacted
from app.settings import get_settings

__all__ = ["register"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

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
    uvicorn.run(
        "app.asgi:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
        proxy_headers=False,
    )
    return 0


def _db_upgrade(_: argparse.Namespace) -> int:
    from app.database import upgrade_database

    url = get_settings().database.url
    asyncio.run(upgrade_database(url))
    print(f"database is at the latest revision: {redacted(url)}")
    return 0


async def rebuild_projections(url: str, names: list[str] | None = None) -> list[tuple[str, int]]:
    """Rebuild the named projections (default: all); returns (name, position) for each."""
    from app.database import create_engine, upgrade_database
    from app.projections import ProjectionRunner, UnknownProjection, all_projections

    await upgrade_database(url)
    engine = create_engine(url, pool_size=2)
    try:
        runner = ProjectionRunner(engine, all_projections())
        done = []
        for name in names or sorted(runner.projections):
            try:
                done.append((name, await runner.rebuild(name)))
            except UnknownProjection as exc:
                raise CliError(exc.args[0], code=2) from None
        return done
    finally:
        await engine.dispose()


def _projections_rebuild(args: argparse.Namespace) -> int:
    url = get_settings().database.url
    for name, position in asyncio.run(rebuild_projections(url, [args.name] if args.name else None)):
        print(f"rebuilt {name} up to position {position}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve", help="run the HTTP/SSE service", description="Run the HTTP/SSE service."
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
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
        help="rebuild projections from position 0 (all, or the one named)",
        description="Empty the read models and fold the whole log again, in one transaction.",
    )
    rebuild.add_argument("name", nargs="?", help="projection name (default: all)")
    rebuild.set_defaults(handler=_projections_rebuild, quiet=False)

"""Command line: ``python -m app serve | db upgrade | projections rebuild``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from app.settings import SettingsError, get_settings

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()  # fail here, with a clear message, not inside a worker
    del settings
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
    print(f"database is at the latest revision: {_redacted(url)}")
    return 0


def _projections_rebuild(args: argparse.Namespace) -> int:
    from app.database import create_engine, upgrade_database
    from app.projections import ProjectionRunner, UnknownProjection, all_projections

    async def rebuild() -> int:
        url = get_settings().database.url
        await upgrade_database(url)
        engine = create_engine(url, pool_size=2)
        try:
            runner = ProjectionRunner(engine, all_projections())
            names = [args.name] if args.name else sorted(runner.projections)
            for name in names:
                try:
                    position = await runner.rebuild(name)
                except UnknownProjection as exc:
                    print(f"error: {exc.args[0]}", file=sys.stderr)
                    return 2
                print(f"rebuilt {name} up to position {position}")
        finally:
            await engine.dispose()
        return 0

    return asyncio.run(rebuild())


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app", description="Event-sourced activity service."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP/SSE service")
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
    serve.set_defaults(handler=_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply pending migrations")
    upgrade.set_defaults(handler=_db_upgrade)

    projections = commands.add_parser("projections", help="read-model maintenance")
    projection_commands = projections.add_subparsers(
        dest="projections_command", required=True, metavar="COMMAND"
    )
    rebuild = projection_commands.add_parser(
        "rebuild", help="rebuild projections from position 0 (all, or the one named)"
    )
    rebuild.add_argument("name", nargs="?", help="projection name (default: all)")
    rebuild.set_defaults(handler=_projections_rebuild)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Migrations run on every start; their step-by-step chatter is not news.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code: int = args.handler(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

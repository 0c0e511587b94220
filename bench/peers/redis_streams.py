"""The Redis Streams peer: a private ``redis-server`` with append-only-file persistence.

Redis Streams are the common off-the-shelf answer to "an append-only log that clients replay
by id", so the service's durable append and replay are measured against them. Each
measurement gets its own server on a free loopback port, in a temporary directory, so no
state or configuration is shared with any other Redis on the machine.

Durability is chosen per server: ``appendfsync always`` fsyncs the AOF before answering a
write (the service's ``synchronous=FULL``), ``everysec`` may lose the last second, and no
AOF at all measures what the Python client can push when Redis does no disk work.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from bench.load import free_port, start_server, stop_server

__all__ = ["Fsync", "RedisUnavailable", "find_redis_server", "redis_server"]

#: ``appendfsync`` for the AOF, or ``None`` for no persistence at all.
Fsync = Literal["always", "everysec", "no"] | None

_READY_TIMEOUT_S = 15.0
_install_tried = False


class RedisUnavailable(RuntimeError):
    """redis-server is not installed and could not be installed, or did not start."""


def find_redis_server() -> str:
    """The path of ``redis-server``, installing Debian's package once if it is missing."""
    global _install_tried
    found = shutil.which("redis-server")
    if found is not None:
        return found
    if not _install_tried:
        _install_tried = True
        print("redis-server not found; trying apt-get install redis-server", file=sys.stderr)
        try:
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "redis-server"],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise RedisUnavailable(f"redis-server missing and not installable: {error}") from error
        found = shutil.which("redis-server")
    if found is None:
        raise RedisUnavailable("redis-server is not installed")
    return found


def _command(binary: str, directory: Path, fsync: Fsync) -> list[str]:
    command = [
        binary,
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
        "--loglevel",
        "warning",
        "--daemonize",
        "no",
        # No RDB snapshots: only the AOF (when enabled) writes to disk.
        "--save",
        "",
    ]
    if fsync is None:
        return [*command, "--appendonly", "no"]
    return [*command, "--appendonly", "yes", "--appendfsync", fsync]


async def _answers_ping(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-500:] if log.exists() else ""


async def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisUnavailable(
                f"redis-server exited with {process.returncode}: {_log_tail(log)}"
            )
        if await _answers_ping(port):
            return
        await asyncio.sleep(0.05)
    raise RedisUnavailable(f"redis-server did not answer PING within {_READY_TIMEOUT_S:.0f} s")


@asynccontextmanager
async def redis_server(fsync: Fsync = "always") -> AsyncIterator[str]:
    """Run a private redis-server for the block; yield its ``redis://`` URL.

    The server is stopped with SIGTERM (Redis then fsyncs the AOF and exits without a
    snapshot) and its directory removed, whatever the block raises.
    """
    binary = find_redis_server()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        port = free_port()
        try:
            process = start_server(
                _command(binary, Path(directory), fsync), port, cwd=Path(directory)
            )
        except OSError as error:
            raise RedisUnavailable(f"could not start redis-server: {error}") from error
        try:
            await _wait_ready(port, process, Path(directory) / "redis.log")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            await asyncio.to_thread(stop_server, process)


async def _main() -> None:
    for fsync in ("always", "everysec", None):
        async with redis_server(fsync) as url:
            print(f"appendfsync {fsync or 'off (no AOF)'}: {url} answered PING")


if __name__ == "__main__":
    asyncio.run(_main())

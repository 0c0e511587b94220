"""nginx with the nchan module: the C pub/sub server that SSE fan-out is compared with.

Debian's ``nginx-light`` and ``libnginx-mod-nchan`` (installed with apt-get when missing).
The bench runs its own nginx in the foreground (``daemon off``) from a configuration, pid
file, logs and temp paths in a temporary directory, on a free loopback port, so the
package's default site neither matters nor has to be running:

- ``POST /pub?id=CHANNEL`` publishes the body as one message (``201`` when a subscriber
  got it, ``202`` when it was only buffered);
- ``GET /sub/CHANNEL`` with ``Accept: text/event-stream`` is an EventSource subscriber.

Channels buffer up to :data:`BUFFER_LENGTH` messages that never expire, so a subscriber
resumes with ``Last-Event-ID``. nchan's ids are ``"<seconds>:<n>"`` strings (``n`` counts
the messages published in that second), not integers; ``Last-Event-ID: 0:0`` asks for the
oldest message still buffered. :func:`nchan_replay_rate` times one subscriber reading a
whole buffered channel that way: the counterpart of the service's SSE replay.

nchan delivers a backlog in time quadratic in its length (each next message is looked up
anew; the rate climbs as the backlog shrinks): on this machine 60,000 messages took 17 s
and 200,000 took 235 s (850/s), so 1,000,000 would take well over an hour. The buffer
holds a million; the replay is measured at :data:`REPLAY_MAX` at most.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.load import free_port, raise_open_files, read_response, stop_server, wait_ready

__all__ = [
    "BUFFER_LENGTH",
    "REPLAY_MAX",
    "NchanUnavailable",
    "nchan_process",
    "nchan_replay_rate",
    "nchan_server",
    "parse_nchan_id",
    "publish_many",
]

NGINX = Path("/usr/sbin/nginx")
MODULE_DIRS = (Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules"))
MODULE_NAME = "ngx_nchan_module.so"
PACKAGES = ("nginx-light", "libnginx-mod-nchan")
#: Messages a channel holds; enough for the replay figure's largest size.
BUFFER_LENGTH = 1_000_000
#: Shared memory for the buffered messages (about 0.6 KiB each for an envelope).
RESERVED_MEMORY = "1024M"
#: The largest backlog :func:`nchan_replay_rate` replays (see the module's docstring).
REPLAY_MAX = 200_000
#: Messages published in any one second (nchan's per-second counter is 16 bits).
PER_SECOND = 25_000
_ID = re.compile(rb"^id: ?([^\r\n]+)\r?$", re.MULTILINE)

_CONFIG = """\
load_module {module};
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
worker_rlimit_nofile {files};
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {root}/temp/body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    keepalive_requests 10000000;
    client_body_buffer_size 64k;
    nchan_max_reserved_memory {memory};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /health {{
            default_type application/json;
            return 200 '{{"status": "ok"}}';
        }}
        location = /pub {{
            nchan_publisher http;
            nchan_channel_id $arg_id;
            nchan_message_buffer_length {buffer};
            nchan_message_timeout 0;
        }}
        location ~ ^/sub/([A-Za-z0-9_-]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_message_buffer_length {buffer};
            nchan_message_timeout 0;
            nchan_subscriber_first_message newest;
        }}
    }}
}}
"""


class NchanUnavailable(RuntimeError):
    """nginx or its nchan module is missing and could not be installed, or did not start."""


def _module_path() -> Path | None:
    for directory in MODULE_DIRS:
        if (directory / MODULE_NAME).is_file():
            return directory / MODULE_NAME
    return None


def _ensure_installed() -> Path:
    """The nchan module's path, installing the Debian packages when missing."""
    module = _module_path()
    if NGINX.is_file() and module is not None:
        return module
    if shutil.which("apt-get") is None:
        raise NchanUnavailable("nginx/nchan are not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # An old or empty package list: refresh it once and try again.
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    module = _module_path()
    if done.returncode != 0 or not NGINX.is_file() or module is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise NchanUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {tail}")
    return module


@contextmanager
def nchan_server(connections: int = 4096) -> Iterator[str]:
    """Run nginx + nchan on a free loopback port; yields its base url.

    One worker process, as the service runs one. Raises :class:`NchanUnavailable` when it
    cannot be installed or started.
    """
    with nchan_process(connections) as (base_url, _):
        yield base_url


@contextmanager
def nchan_process(connections: int = 4096) -> Iterator[tuple[str, int]]:
    """As :func:`nchan_server`, yielding its base url and the process group of its master
    and worker (for :mod:`bench.procs`)."""
    module = _ensure_installed()
    files = raise_open_files(2 * connections + 1024)
    with tempfile.TemporaryDirectory(prefix="bench-nchan-") as directory:
        root = Path(directory)
        (root / "logs").mkdir()
        (root / "temp").mkdir()
        port = free_port()
        config = root / "nginx.conf"
        config.write_text(
            _CONFIG.format(
                module=module,
                root=root,
                port=port,
                files=files,
                connections=connections + 64,
                memory=RESERVED_MEMORY,
                buffer=BUFFER_LENGTH,
            )
        )
        process = subprocess.Popen(
            [str(NGINX), "-c", str(config), "-p", str(root), "-e", str(root / "logs/error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(base_url, 15.0, process)
            except (RuntimeError, TimeoutError) as exc:
                log = (root / "logs/error.log").read_text(errors="replace")[-600:]
                raise NchanUnavailable(f"nginx did not start: {exc}; {log.strip()}") from exc
            yield base_url, process.pid
        finally:
            stop_server(process)


def parse_nchan_id(raw: bytes) -> tuple[int, int]:
    """``b"1764040000:12"`` -> ``(1764040000, 12)``: ordered as nchan orders messages."""
    seconds, _, tag = raw.partition(b":")
    return int(seconds), int(tag)


def _publish_request(host: str, channel: str, body: bytes) -> bytes:
    return (
        f"POST /pub?id={channel} HTTP/1.1\r\nhost: {host}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_responses(reader: asyncio.StreamReader, count: int) -> None:
    for _ in range(count):
        status = await read_response(reader)
        if not status.startswith((b"HTTP/1.1 201", b"HTTP/1.1 202")):
            raise RuntimeError(f"nchan publish answered {status!r}")


async def publish_many(base_url: str, channel: str, bodies: list[bytes], clients: int = 4) -> None:
    """Publish ``bodies`` into ``channel``, at most :data:`PER_SECOND` in any one second.

    nchan numbers the messages of one second with a 16-bit counter: past 32,767 in the same
    second, ids wrap and subscribers stall ("Missed message ... tags don't match"). Within
    a second, ``clients`` connections pipeline their shares, so order is not kept.
    """
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80

    async def one(mine: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            answers = asyncio.create_task(_read_responses(reader, len(mine)))
            for first in range(0, len(mine), 500):
                batch = mine[first : first + 500]
                writer.write(
                    b"".join(_publish_request(f"{host}:{port}", channel, b) for b in batch)
                )
                await writer.drain()
            await answers
        finally:
            writer.close()

    for start in range(0, len(bodies), PER_SECOND):
        # Start each second's share at the top of a second, after the last one has ended.
        await asyncio.sleep(1.0 - time.time() % 1.0)
        share = bodies[start : start + PER_SECOND]
        await asyncio.gather(*(one(share[i::clients]) for i in range(clients)))


async def nchan_replay_rate(events: int, base_url: str | None = None) -> float:
    """Publish ``events`` messages (at most :data:`REPLAY_MAX`) into a fresh channel, not
    timed, then time one EventSource subscriber reading all of them from the oldest
    (``Last-Event-ID: 0:0``); events/s. Starts its own nginx unless ``base_url`` is given."""
    if events > REPLAY_MAX:
        print(
            f"nchan replay: {events:,} buffered messages would take over an hour (nchan's "
            f"backlog delivery is quadratic); measuring {REPLAY_MAX:,}",
            file=sys.stderr,
        )
        events = REPLAY_MAX
    if base_url is None:
        with nchan_server() as own_url:
            return await nchan_replay_rate(events, own_url)
    channel = f"replay{os.urandom(4).hex()}"
    bodies = [_envelope(n) for n in range(events)]
    await publish_many(base_url, channel, bodies)
    seen = 0
    last = (0, -1)
    pending = b""
    headers = {"accept": "text/event-stream", "last-event-id": "0:0"}
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(30.0)) as client:
        started = time.perf_counter()
        async with (
            asyncio.timeout(60.0 + events / 200),
            client.stream("GET", f"/sub/{channel}", headers=headers) as stream,
        ):
            if stream.status_code != 200:
                raise RuntimeError(f"nchan subscribe answered {stream.status_code}")
            async for chunk in stream.aiter_raw():
                buffer = pending + chunk
                end = buffer.rfind(b"\n\n") + 2
                pending = buffer[end:] if end >= 2 else buffer
                if end < 2:
                    continue
                for found in _ID.findall(buffer, 0, end):
                    current = parse_nchan_id(found)
                    if current <= last:
                        raise AssertionError(f"nchan ids not increasing: {last} then {current}")
                    last = current
                    seen += 1
                if seen >= events:
                    break
        elapsed = time.perf_counter() - started
    if seen != events:
        raise RuntimeError(f"nchan replayed {seen} of {events} buffered messages")
    return events / elapsed


def _envelope(n: int) -> bytes:
    """A message body shaped like the service's envelope, so both move the same bytes."""
    return (
        b'{"position":%d,"stream":"agent","source_id":"bench-%d","version":%d,'
        b'"event":"progress","event_id":"6f1c2a7e-0d4b-4c39-9f3e-2b8f5a1d7c90",'
        b'"timestamp":"2025-01-24T12:34:56.789Z","payload":{"agent_name":"bench",'
        b'"status":"running","message":"step %d","progress":0.5}}'
    ) % (n + 1, n % 100, n // 100 + 1, n)


def main() -> None:
    parser = argparse.ArgumentParser(description="nchan replay of a buffered channel")
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    try:
        rate = asyncio.run(nchan_replay_rate(args.events))
    except NchanUnavailable as exc:
        print(f"nchan skipped: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"nchan replay of {args.events:,} buffered messages: {rate:,.0f} events/s")


if __name__ == "__main__":
    main()

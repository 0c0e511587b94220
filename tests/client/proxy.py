"""A TCP relay between a client and a server, for tests to break the network in between."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Proxy"]


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class Proxy:
    """Relays 127.0.0.1:<port> to the upstream port, which may come and go (a restarting
    server: a connection that finds no upstream is closed at once).

    ``sever()`` cuts every open connection abruptly (RST), as a network drop would;
    ``freeze()`` makes the open connections silent in both directions without closing them,
    as a dead peer behind a NAT would; ``drop_responses(n)`` lets the next ``n`` requests
    reach the server but cuts the connection when the answer comes back, so the server has
    done the work and the client never hears of it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.accepted = 0
        self.dropped = 0
        self._drop = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_links(self) -> int:
        """Connections open and relaying (not frozen)."""
        return sum(1 for link in self._links if not link.frozen)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sever(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        return len(links)

    def freeze(self) -> int:
        for link in self._links:
            link.frozen = True
        return len(self._links)

    def drop_responses(self, count: int) -> None:
        self._drop = count

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        for task in (
            asyncio.create_task(self._pump(link, reader, up_writer, answers=False)),
            asyncio.create_task(self._pump(link, up_reader, writer, answers=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        answers: bool,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if link.frozen:
                    continue
                if answers and self._drop > 0:
                    self._drop -= 1
                    self.dropped += 1
                    link.abort()
                    return
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link.frozen:
                link.abort()
            self._links.discard(link)
            with contextlib.suppress(Exception):
                writer.close()

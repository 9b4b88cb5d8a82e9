"""A loopback relay in front of a private PostgreSQL that stops the server at one exact
point of a client's conversation: the first time the client sends ``trigger``.

The statement that carries ``trigger`` is held back, the server is stopped
(``pg_ctl -m immediate``: sessions cut, as when the database host goes away), and
only then are the client's connections closed.  So the client loses its database
exactly there, every run, with no sleep to race.  Later connections are relayed
again, and fail while the server is down: it comes back with ``pg.start()``.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from private_pg import PrivatePostgres


class PgCut:
    def __init__(self, pg: PrivatePostgres, trigger: bytes) -> None:
        self.pg = pg
        self.trigger = trigger
        self.cut = threading.Event()  # set once the server was stopped
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="pg-cut").start()

    @property
    def url(self) -> str:
        return self.pg.url.replace(f":{self.pg.port}/", f":{self.port}/")

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.pg.port), timeout=5)
            except OSError:
                client.close()  # the server is down: as a refused connection
                continue
            server.settimeout(None)
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, pair, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, pair, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket,
              pair: tuple[socket.socket, socket.socket], from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.trigger in data and not self.cut.is_set():
                    with self._lock:
                        if not self.cut.is_set():
                            self.pg.stop()
                            self.cut.set()
                    break  # the statement never reaches the server
                dst.sendall(data)
        except OSError:
            pass
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

"""A TCP server on 127.0.0.1 that accepts connections and never answers.

The git server that hangs: what ``git daemon`` or a web server looks like
from the client's side when it is wedged. Used by ``test_deadlines.py`` to
show that every fetch has a deadline and that a hung deploy neither starves
the other plugins nor keeps the server from stopping.
"""

from __future__ import annotations

import socket
import threading
import typing as t


class SilentServer:
    """Accepts on a free port of 127.0.0.1, reads and discards, never writes.

    ``accepted`` counts the connections; :meth:`wait_accepted` blocks until
    at least ``n`` arrived. Stopped (listener and every connection closed)
    by :meth:`close` or at the end of a ``with`` block.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._changed = threading.Condition()
        self._connections: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    def url(self, scheme: str, path: str = "repo.git") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._changed:
                if self._closed:
                    conn.close()
                    return
                self._connections.append(conn)
                self.accepted += 1
                self._changed.notify_all()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        # Read what the client says (its request) so it never blocks writing; answer nothing.
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def wait_accepted(self, n: int, timeout: float = 60.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.accepted >= n, timeout):
                raise AssertionError(f"only {self.accepted} of {n} connections arrived in {timeout} s")

    def close(self) -> None:
        with self._changed:
            self._closed = True
            connections, self._connections = self._connections, []
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        except OSError:
            pass
        self._listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> t.Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A listening socket that counts the connections it accepts: sandbox tests check none got through."""

from __future__ import annotations

import os
import socket
import threading

__all__ = ["CountingListener"]


class CountingListener:
    """Accepts (and closes) connections on a background thread, counting them in :attr:`accepted`.

    ``CountingListener.tcp()`` listens on the host's loopback (:attr:`port`), ``CountingListener.unix(path)``
    on a unix socket file anyone may connect to.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @classmethod
    def tcp(cls) -> CountingListener:
        """On 127.0.0.1, a free port."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        return cls(sock)

    @classmethod
    def unix(cls, path: str) -> CountingListener:
        """On the unix socket ``path``, writable by everyone."""
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        os.chmod(path, 0o777)
        return cls(sock)

    @property
    def port(self) -> int:
        """The TCP port (for :meth:`tcp` listeners)."""
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        """Stop accepting and close the socket."""
        self._stop = True
        self._thread.join()
        self.sock.close()

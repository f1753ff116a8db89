"""The fault injectors themselves: a recovery test is only as good as the fault it injects."""

from __future__ import annotations

import socket
import threading
import time

from tests.utils.faults import TcpProxy


def test_a_dropped_proxy_resets_a_connection_whose_reply_is_in_flight():
    """The reply the server sends after the drop is lost, and the client learns at once that the connection
    is gone: a database client waiting on it would otherwise hang forever (no RST, no FIN)."""
    server = socket.create_server(("127.0.0.1", 0))
    replied = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(100)
            time.sleep(0.5)  # the drop lands here, while the "query" is being answered
            try:
                connection.sendall(b"reply")
            except OSError:
                pass
            replied.set()
            connection.recv(100)  # hold the server side open: only the proxy may end the connection

    threading.Thread(target=serve, daemon=True).start()
    proxy = TcpProxy("127.0.0.1", server.getsockname()[1])
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        client.sendall(b"query")
        time.sleep(0.2)
        proxy.drop()
        started = time.monotonic()
        try:
            received = client.recv(100)
        except ConnectionResetError:
            received = b""
        assert received == b"" and time.monotonic() - started < 5  # end of stream or reset, not a 10 s wait
        assert replied.wait(5)
        # Refused while dropped, accepted again once restored.
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            refused = False
        except OSError:
            refused = True
        assert refused
        proxy.restore()
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    finally:
        proxy.close()
        server.close()

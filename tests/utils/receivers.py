"""A real HTTP server on loopback that records the verdict callbacks it receives."""

from __future__ import annotations

from dfmod.loopback import free_port


class CallbackReceiver:
    """An ``http.server`` on a free loopback port that records every request and fails the first ``fail_first``."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.fail_first = fail_first
        self.fail_status = fail_status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append((dict(self.headers), body))
                    failing = len(receiver.requests) <= receiver.fail_first
                self.send_response(receiver.fail_status if failing else 200)
                self.end_headers()
                self.wfile.write(b"try later" if failing else b"ok")

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

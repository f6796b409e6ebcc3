"""A file server on 127.0.0.1 for the download tests: serves `files` (name -> bytes) with HTTP
Range support, counts requests per name, can cut a response midway, and can hold responses
until the test releases them."""

from __future__ import annotations

import http.server
import threading
from collections import Counter


class FileServer:
    """`url` is the mirror URL; `requests[name]` counts GETs, `ranges[name]` lists Range headers;
    a name in `cut` gets its first response cut after half the bytes; while `gate` is clear,
    responses wait for it (`waiting` counts requests held there)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.ranges = dict(files), Counter(), {}
        self.cut: set[str] = set()
        self.gate, self.waiting = threading.Event(), Counter()
        self.gate.set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.serve(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        name = handler.path.lstrip("/")
        self.requests[name] += 1
        self.ranges.setdefault(name, []).append(handler.headers.get("Range"))
        self.waiting[name] += 1
        assert self.gate.wait(60), "the test never opened the gate"
        if name not in self.files:
            handler.send_error(404)
            return
        data, start = self.files[name], 0
        if handler.headers.get("Range"):
            start = int(handler.headers["Range"].removeprefix("bytes=").rstrip("-"))
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if name in self.cut:
            self.cut.discard(name)
            handler.wfile.write(data[start:start + (len(data) - start) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)  # the connection drops midway
            return
        handler.wfile.write(data[start:])

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()

"""A `ditlab serve` app on 127.0.0.1 in a thread of the test process, and a small HTTP client."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import torch
from helpers import wait_for  # also imported from here by the serve and hub tests

DEADLINE_S = 60.0  # generous: polls stop as soon as their condition holds


def save_digits_checkpoint(path, model) -> str:
    """A checkpoint laid out as `ditlab train --data digits` writes it (pixel space, classes "0".."9")."""
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "step": 7,
                "config": {"data": "digits"}, "model_config": model.config}, path)
    return str(path)


class LiveServer:
    """uvicorn serving `asgi_app` on a free port of 127.0.0.1 until `close`."""

    def __init__(self, asgi_app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        conn.close()
        return out

    def sample(self, **body) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", "/api/sample", body)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=DEADLINE_S)
        self.sock.close()

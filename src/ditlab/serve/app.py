"""The web side of `ditlab serve`: a Starlette app with one HTML page and a JSON API.

    GET  /             the page (no asset from outside: its script and style are inline)
    GET  /api/info     model name, config, classes with names, samplers, limits, defaults
    GET  /api/status   queue length, batches and images run, the newest batches
    POST /api/sample   {"classes", "per_class", "cfg_scale", "sampler", "steps", "seed",
                        "guidance_channels", "guidance_interval" [lo, hi], "guidance_t" [lo, hi],
                        "guide" (autoguidance, where served with --guide-ckpt), "format"}
                        -> image/png with the record in the X-Ditlab-Record header;
                        "format": "json" -> {"record", "png" (base64)};
                        "format": "stream" -> NDJSON progress lines, then that JSON

Errors are JSON {"error": "<field>: <one line>"}: 400 for a bad request, 413 for a body over the
limit, 503 with Retry-After when the queue is full, 500 when sampling failed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ditlab.serve.batcher import Batcher, Job, QueueFull
from ditlab.serve.engine import Engine
from ditlab.serve.record import grid_columns, grid_png, sample_record
from ditlab.serve.requests import BadRequest, Defaults, Limits, SampleRequest, parse_request

TICK_S = 0.1  # how often a waiting request looks at its job's progress and its client's connection
RECORD_HEADER = "X-Ditlab-Record"


def error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit` bytes (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
    except ClientDisconnect as e:  # it sent less than its Content-Length and hung up: nobody to answer
        raise BadRequest("body: the client closed the connection before sending all of it") from e
    return bytes(body)


class ServeApp:
    """The routes over one engine and its batcher."""

    def __init__(self, engine: Engine, limits: Limits, defaults: Defaults, window_s: float = 0.02):
        self.engine, self.limits, self.defaults = engine, limits, engine.defaults_for(defaults)
        self.batcher = Batcher(engine.run, max_queue=limits.max_queue, max_batch_images=limits.max_images,
                               window_s=window_s)
        self.page = resources.files("ditlab.serve").joinpath("page.html").read_text(encoding="utf-8")
        routes = [Route("/", self.index), Route("/api/info", self.info), Route("/api/status", self.status),
                  Route("/api/sample", self.sample, methods=["POST"])]
        self.app = Starlette(routes=routes, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.batcher.start()
        try:
            yield
        finally:
            self.batcher.stop()

    async def index(self, request: Request) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def info(self, request: Request) -> JSONResponse:
        from dataclasses import asdict

        return JSONResponse({**self.engine.info(), "limits": asdict(self.limits), "defaults": asdict(self.defaults)})

    async def status(self, request: Request) -> JSONResponse:
        b = self.batcher
        return JSONResponse({"queued": b.queued, "batches_run": b.batches_run, "images_run": b.images_run,
                             "batches": list(b.batches)})

    async def sample(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.limits.max_body_bytes)
        except BadRequest as e:
            return error(str(e), e.status)
        if body is None:
            return error(f"body: larger than {self.limits.max_body_bytes} bytes", 413)
        try:
            req = parse_request(body, self.engine.class_names, self.limits, self.defaults, self.engine.samplers,
                                self.engine.latent_channels, has_guide=self.engine.guide is not None)
            job = self.batcher.submit(req)
        except BadRequest as e:
            return error(str(e), e.status)
        except QueueFull as e:
            return error(str(e), 503, {"Retry-After": str(e.retry_after)})
        if req.format == "stream":
            return StreamingResponse(self._events(job), media_type="application/x-ndjson")
        try:
            while not job.future.done():
                await asyncio.wait([asyncio.wrap_future(job.future)], timeout=TICK_S)
                if not job.future.done() and await request.is_disconnected():
                    self.batcher.cancel(job)  # frees its place in the queue
                    return Response(status_code=499)
        finally:
            if not job.future.done():
                self.batcher.cancel(job)
        try:
            png, record = await asyncio.to_thread(self._result, job)
        except Exception as e:
            return error(f"sampling failed: {type(e).__name__}: {e}", 500)
        if req.format == "json":
            return JSONResponse(result_json(png, record))
        return Response(png, media_type="image/png",
                        headers={RECORD_HEADER: json.dumps(record), "Content-Disposition":
                                 f'inline; filename="ditlab-seed-{req.seed}.png"'})

    def _result(self, job: Job) -> tuple[bytes, dict[str, Any]]:
        """The job's grid as PNG bytes and its record (raises what sampling raised)."""
        images = job.future.result()
        req: SampleRequest = job.request
        record = sample_record(self.engine.meta, req.settings())
        return grid_png(images, grid_columns(len(req.classes), req.per_class), record), record

    async def _events(self, job: Job) -> AsyncIterator[bytes]:
        """NDJSON: {"state": "queued"|"running", "step", "steps"} while it waits, then the result."""
        last = None
        try:
            while not job.future.done():
                await asyncio.wait([asyncio.wrap_future(job.future)], timeout=TICK_S)
                event = {"state": job.state, "step": job.steps_done, "steps": job.request.steps,
                         "batch_images": job.batch_images}
                if event != last and not job.future.done():
                    yield (json.dumps(event) + "\n").encode()
                    last = event
            try:
                png, record = await asyncio.to_thread(self._result, job)
                final = {"state": "done", **result_json(png, record)}
            except Exception as e:
                final = {"state": "error", "error": f"sampling failed: {type(e).__name__}: {e}"}
            yield (json.dumps(final) + "\n").encode()
        finally:  # the client went away (the response was cancelled) before the result
            if not job.future.done():
                self.batcher.cancel(job)


def result_json(png: bytes, record: dict[str, Any]) -> dict[str, Any]:
    return {"record": record, "png": base64.b64encode(png).decode("ascii")}


def create_app(engine: Engine, limits: Limits | None = None, defaults: Defaults | None = None,
               window_s: float = 0.02) -> ServeApp:
    """The server's app (`.app`, an ASGI app) over a loaded engine; its batcher starts with the app."""
    return ServeApp(engine, limits or Limits(), defaults or Defaults(), window_s)

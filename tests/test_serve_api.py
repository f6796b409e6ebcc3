"""`ditlab serve`'s JSON API on 127.0.0.1: the grid and its record, every refusal, the queue's
limits, a client that goes away, and requests of many users sharing model batches."""

import base64
import io
import json
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_helpers import LiveServer, save_digits_checkpoint, wait_for  # noqa: E402

from ditlab.cli import main  # noqa: E402
from ditlab.serve.app import create_app  # noqa: E402
from ditlab.serve.engine import Engine  # noqa: E402
from ditlab.serve.record import RECORD_KEY  # noqa: E402
from ditlab.serve.requests import Defaults, Limits  # noqa: E402

FAST = {"steps": 3, "sampler": "ddpm", "cfg_scale": 2.0}


class GatedEngine:
    """The real engine, whose batches wait for `gate` (set by default): lets a test hold the
    worker busy while it fills the queue."""

    def __init__(self, engine: Engine):
        self.engine, self.gate, self.entered = engine, threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, requests, on_step=lambda: None):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.engine.run(requests, on_step)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from helpers import randomize

    import ditlab

    model = randomize(ditlab.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=384, depth=1, num_heads=6,
                                 num_classes=10).eval(), 0, std=0.05)
    ckpt = save_digits_checkpoint(tmp_path_factory.mktemp("serve") / "step-0000007.pt", model)
    engine = GatedEngine(Engine(ckpt, device="cpu"))
    limits = Limits(max_steps=50, max_images=16, max_queue=3, max_body_bytes=2048)
    app = create_app(engine, limits, Defaults(steps=3, per_class=1), window_s=0.0)
    server = LiveServer(app.app)
    yield server, engine, app, ckpt
    engine.gate.set()
    server.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_info_names_the_classes_limits_and_defaults(served):
    server, *_ = served
    status, headers, body = server.request("GET", "/api/info")
    info = json.loads(body)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert [c["name"] for c in info["classes"]] == [str(i) for i in range(10)] and info["conditional"]
    assert info["limits"]["max_steps"] == 50 and info["limits"]["max_queue"] == 3
    assert set(info["samplers"]) == {"ddpm", "ddim", "dpm++2m"} and info["config"]["depth"] == 1
    status, headers, page = server.request("GET", "/")
    assert status == 200 and b"Generate" in page and b"http" not in page.split(b"<script>")[1]  # no outside asset


def test_png_is_what_ditlab_sample_draws_with_the_recorded_command(served, tmp_path):
    server, _, _, ckpt = served
    status, headers, png = server.sample(classes=[3, "7"], per_class=2, seed=5, **FAST)
    assert status == 200 and headers["content-type"] == "image/png"
    record = json.loads(headers["x-ditlab-record"])
    assert record == json.loads(Image.open(io.BytesIO(png)).text[RECORD_KEY])  # the PNG carries it too
    assert record["labels"] == [3, 3, 7, 7] and record["seed"] == 5 and record["checkpoint"] == ckpt
    assert record["class_names"] == ["3", "7"] and record["torch"] == torch.__version__
    grid = pixels(png)
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)  # 2 rows (classes) of 2 images of 8x8, padding 2
    out = tmp_path / "grid.png"
    argv = record["command"].split()[1:]
    argv[argv.index("--out") + 1] = str(out)
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    assert np.array_equal(pixels(out.read_bytes()), grid)  # same batch of 4, same kernels: bitwise


def test_json_format_and_random_seed(served):
    server, *_ = served
    _, headers, png = server.sample(classes=[1], per_class=1, seed=9, **FAST)
    status, _, body = server.sample(classes=[1], per_class=1, seed=9, format="json", **FAST)
    result = json.loads(body)
    assert status == 200 and base64.b64decode(result["png"]) == png
    assert result["record"] == json.loads(headers["x-ditlab-record"])
    status, headers, _ = server.sample(classes=[1], per_class=1, seed="random", **FAST)
    assert status == 200 and 0 <= json.loads(headers["x-ditlab-record"])["seed"] < 2**31


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body"), (b"[1, 2]", "body"), ({"clases": [1]}, "clases"), ({"classes": []}, "classes"),
    ({"classes": [10]}, "classes"), ({"classes": ["eleven"]}, "classes"), ({"classes": [True]}, "classes"),
    ({"classes": 3}, "classes"), ({"classes": [1], "sampler": "euler"}, "sampler"),
    ({"classes": [1], "steps": 0}, "steps"), ({"classes": [1], "steps": 51}, "steps"),
    ({"classes": [1], "steps": 2.5}, "steps"), ({"classes": [1, 2], "per_class": 9}, "per_class"),
    ({"classes": [1], "per_class": 0}, "per_class"), ({"classes": [1], "cfg_scale": -1}, "cfg_scale"),
    ({"classes": [1], "cfg_scale": "high"}, "cfg_scale"), ({"classes": [1], "cfg_scale": 21}, "cfg_scale"),
    ({"classes": [1], "seed": -3}, "seed"), ({"classes": [1], "seed": 2**64}, "seed"),
    ({"classes": [1], "guidance_channels": 4}, "guidance_channels"), ({"classes": [1], "format": "gif"}, "format"),
    ({"classes": list(range(10)) * 2}, "classes"),
])
def test_bad_requests_are_400_with_one_line_naming_the_field(served, body, field):
    server, *_ = served
    status, headers, out = server.request("POST", "/api/sample", body)
    message = json.loads(out)["error"]
    assert status == 400 and message.startswith(field + ":") and "\n" not in message, message


def test_a_body_over_the_limit_is_413_and_nothing_is_queued(served):
    server, _, app, _ = served
    status, _, out = server.request("POST", "/api/sample", b'{"classes": [1], "x": "' + b"a" * 4096 + b'"}')
    assert status == 413 and json.loads(out)["error"].startswith("body:") and app.batcher.queued == 0


def _hold_the_worker(server, engine):
    """Close the gate and send one request; return once the worker holds it at the gate."""
    engine.gate.clear()
    engine.entered.clear()
    t = _background(server, [], classes=[8], seed=0, **FAST)
    wait_for(engine.entered.is_set, "the worker to take the first request")
    return t


def _background(server, results, **body):
    t = threading.Thread(target=lambda: results.append(server.sample(**body)), daemon=True)
    t.start()
    return t


def test_full_queue_is_503_with_retry_after_and_a_gone_client_frees_its_slot(served):
    server, engine, app, _ = served
    results = []
    try:
        threads = [_hold_the_worker(server, engine)]
        threads += [_background(server, results, classes=[2], seed=s, **FAST) for s in (2, 3)]
        wait_for(lambda: app.batcher.queued == 2, "two queued requests")
        raw = socket.create_connection(("127.0.0.1", server.port))  # a third client, who then goes away
        body = json.dumps({"classes": [4], **FAST}).encode()
        raw.sendall(b"POST /api/sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: app.batcher.queued == 3, "the third request queued")
        status, headers, out = server.sample(classes=[5], **FAST)
        assert status == 503 and int(headers["retry-after"]) >= 1 and "queue" in json.loads(out)["error"]
        raw.close()
        wait_for(lambda: app.batcher.queued == 2, "the gone client's slot freed")
    finally:
        engine.gate.set()
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == [200, 200]


def test_requests_share_batches_and_each_image_is_what_it_is_alone(served, monkeypatch):
    """Requests with equal sampler, steps and guidance run in one batch; another key runs apart.
    Each grid equals the one its request gets alone: bitwise where this machine's kernels give a
    row the same bits in any batch size, else to one level of 255 (see tests/test_sample.py)."""
    from helpers import rows_batch_invariant

    server, engine, app, _ = served
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the native convolution (see conftest)
    monkeypatch.setattr(app.batcher, "max_queue", 8)
    bodies = [dict(classes=[1, 2], per_class=2, seed=3), dict(classes=[7], per_class=3, seed=3),
              dict(classes=[0, 9, 4], per_class=1, seed=11)]
    results, threads = [], []
    try:
        threads.append(_hold_the_worker(server, engine))
        before = len(app.batcher.batches)
        for k, b in enumerate(bodies, 1):
            threads.append(_background(server, results, **b, **FAST))
            wait_for(lambda k=k: app.batcher.queued == k, "the request queued")
        threads.append(_background(server, [], classes=[8], **{**FAST, "steps": 4}))  # another key
        wait_for(lambda: app.batcher.queued == 4, "all queued")
    finally:
        engine.gate.set()
    for t in threads:
        t.join(60)
    assert list(app.batcher.batches)[before:] == [(1, 1), (3, 10), (1, 1)]
    together = {json.loads(h["x-ditlab-record"])["labels"][0]: pixels(png) for _, h, png in results}
    alone = {b["classes"][0]: pixels(server.sample(**b, **FAST)[2]) for b in bodies}
    net = engine.engine.net
    exact = rows_batch_invariant(net, (3, 8, 8), (1, 2, 3, 4, 10, 20), num_classes=10)
    for k, grid in alone.items():
        diff = np.abs(grid.astype(int) - together[k].astype(int))
        assert diff.max() <= (0 if exact else 1), (k, diff.max())


def test_class_names_imagenet_folders_and_ids(tmp_path):
    from ditlab.serve.classes import class_names

    names = class_names(1000)
    assert len(names) == 1000 and names[0].startswith("tench") and names[207] == "golden retriever"
    assert names[88] == "macaw" and names[979].startswith("valley")
    for wnid in ("n01440764", "n01443537"):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / wnid / "a.png")
    assert class_names(2, {"data": str(tmp_path)}) == ["n01440764", "n01443537"]  # folder names as stored
    assert class_names(3, {"data": str(tmp_path)}) == ["0", "1", "2"]  # the data no longer matches: ids
    assert class_names(10, {"data": "digits"}) == [str(i) for i in range(10)] and class_names(0) == []

"""Round 2 of the adversarial faults (issue 28) that the CLI fuzz cases cannot reach: a checkpoint
record changed where its tensors are not, files unlike their released names, servers that answer a
resume badly or trickle, a cached file changed since it was verified, damaged .npz members and
.safetensors weights, serve's body parsing, the errno of a failed write, the mode of written files."""

import http.server
import os
import shutil
import time
from collections import deque

import numpy as np
import pytest
import torch
from helpers import unpin
from hub_server import FileServer
from test_hub import CKPT, REF, serve_released, tiny_released_dit, torch_bytes

from ditlab import hub
from ditlab.checkpoints.state import CHECKSUM_KEY, load_checkpoint, save_checkpoint
from ditlab.errors import UserError, UserWriteError
from ditlab.evaluation.batches import NpzImages, save_samples
from ditlab.runtime.files import atomic_write_text


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(4)}, "ema": {"w": torch.randn(4)}, "step": step, "epoch": 0,
            "batch_in_epoch": step, "config": {"lr": 1e-4, "data": "digits"},
            "opt": {"state": {"w": {"step": torch.tensor(float(step))}},
                    "param_groups": [{"lr": 1e-4, "params": ["w"]}]}}


def test_the_checkpoint_checksum_covers_the_whole_record_and_the_step_its_name(tmp_path):
    from ditlab.checkpoints.state import RECORD_KEY

    path = save_checkpoint(tmp_path / "run", 60, _state(60))
    good = dict(load_checkpoint(path))
    assert good["step"] == 60 and RECORD_KEY in good
    for i, change in enumerate([{"step": 61}, {"config": {"lr": 2e-4, "data": "digits"}}, {"batch_in_epoch": 3}]):
        changed = tmp_path / f"changed{i}" / path.name  # the tensors and their digests untouched
        changed.parent.mkdir()
        torch.save({**good, **change}, changed)
        with pytest.raises(UserError, match="damaged checkpoint: its record"):
            load_checkpoint(changed)
    renamed = tmp_path / "renamed" / "step-0000061.pt"
    renamed.parent.mkdir()
    shutil.copy(path, renamed)
    with pytest.raises(UserError, match="holds step 60, its name says 61"):
        load_checkpoint(renamed)
    older = tmp_path / "older" / path.name  # written before the record digest: tensor digests only
    older.parent.mkdir()
    torch.save({k: v for k, v in good.items() if k != RECORD_KEY}, older)
    assert load_checkpoint(older)["step"] == 60 and CHECKSUM_KEY in load_checkpoint(older)


@pytest.fixture
def server(cache, tmp_path, monkeypatch):
    srv = serve_released(tmp_path, monkeypatch)  # pinned: these tests check the pins
    yield srv
    srv.close()


def _left(home) -> list[str]:
    return sorted(p.name for p in home.iterdir() if not p.name.endswith(".lock"))


def test_a_file_unlike_its_released_name_is_refused_and_removed(server, cache):
    with pytest.raises(UserError) as e:  # a tiny DiT served as DiT-XL-2-256x256.pt
        hub.fetch(CKPT, progress=False)
    message = str(e.value)
    assert "not the released file" in message and "depth 1 (the name implies 28)" in message and "\n" not in message
    assert "removed it" in message and _left(cache) == []
    with pytest.raises(UserError, match=r"8x8 images \(the name implies 256x256\)"):
        hub.fetch(REF, progress=False)
    assert _left(cache) == []


def test_a_cached_file_changed_since_it_was_verified_is_checked_again(server, cache, monkeypatch):
    unpin(monkeypatch, REF)
    path = hub.fetch(REF, progress=False)
    assert hub.fetch(REF, progress=False) == path and server.requests[REF] == 1
    path.write_bytes(path.read_bytes()[:100])  # damaged in the cache
    with pytest.raises(UserError, match="removed it; run again to download it"):
        hub.fetch(REF, progress=False)
    assert not path.exists()
    assert hub.fetch(REF, progress=False).read_bytes() == server.files[REF] and server.requests[REF] == 2


def test_a_folder_in_the_way_and_a_malformed_mirror_are_one_line_before_any_download(server, cache, monkeypatch):
    (cache / REF).mkdir(parents=True)
    with pytest.raises(UserError, match="in the way of the download"):
        hub.fetch(REF, progress=False)
    assert server.requests[REF] == 0 and not (cache / f".{REF}.part").exists()
    for mirror in ("http://[::1", "http://host:99999/x", "http:///files"):
        monkeypatch.setenv("DITLAB_MIRROR", mirror)
        with pytest.raises(UserError, match="DITLAB_MIRROR="):
            hub.fetch(CKPT, progress=False)


class _BadRangeServer(FileServer):
    """Answers a Range request with 206 and a malformed Content-Range (and the whole file)."""

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        name = handler.path.lstrip("/")
        self.requests[name] += 1
        self.ranges.setdefault(name, []).append(handler.headers.get("Range"))
        data = self.files[name]
        handler.send_response(206 if handler.headers.get("Range") else 200)
        if handler.headers.get("Range"):
            handler.send_header("Content-Range", "bytes junk")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def test_a_malformed_content_range_restarts_the_download_whole(cache, monkeypatch):
    unpin(monkeypatch, CKPT)
    srv = _BadRangeServer({CKPT: torch_bytes(tiny_released_dit())})
    monkeypatch.setenv("DITLAB_MIRROR", srv.url)
    try:
        cache.mkdir(parents=True)
        (cache / f".{CKPT}.part").write_bytes(srv.files[CKPT][:1000])  # left by an interrupted run
        assert hub.fetch(CKPT, progress=False).read_bytes() == srv.files[CKPT]
        assert srv.ranges[CKPT] == ["bytes=1000-", None] and _left(cache) == [f".{CKPT}.verified", CKPT]
    finally:
        srv.close()


class _TricklingServer(FileServer):
    """The first answer sends half the file, then a byte every 50 ms; a resumed one is served normally."""

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        name = handler.path.lstrip("/")
        if handler.headers.get("Range"):
            return super().serve(handler)
        self.requests[name] += 1
        self.ranges.setdefault(name, []).append(None)
        data = self.files[name]
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        half = len(data) // 2
        handler.wfile.write(data[:half])
        handler.wfile.flush()
        try:
            for i in range(half, len(data)):
                time.sleep(0.05)
                handler.wfile.write(data[i:i + 1])
                handler.wfile.flush()
        except OSError:  # the client gave up on this answer
            pass


def test_a_trickling_download_keeps_its_bytes_and_resumes(cache, monkeypatch):
    unpin(monkeypatch, CKPT)
    monkeypatch.setattr(hub, "STALL_S", 0.5)
    monkeypatch.setattr(hub, "STALL_BYTES", 1 << 20)
    srv = _TricklingServer({CKPT: torch_bytes(tiny_released_dit())})
    monkeypatch.setenv("DITLAB_MIRROR", srv.url)
    try:
        started = time.monotonic()
        assert hub.fetch(CKPT, progress=False).read_bytes() == srv.files[CKPT]
        assert time.monotonic() - started < 30
        resumed_at = int(srv.ranges[CKPT][1].removeprefix("bytes=").rstrip("-"))
        assert srv.ranges[CKPT][0] is None and resumed_at >= len(srv.files[CKPT]) // 2  # nothing received was lost
    finally:
        srv.close()


def _flip_first(path, pattern: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(pattern) + 1] ^= 1
    path.write_bytes(bytes(data))


def test_a_damaged_npz_member_is_one_line_and_a_cached_one_says_to_delete_it(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    save_samples(str(path), np.full((4, 8, 8, 3), 7, np.uint8))
    _flip_first(path, bytes([7]) * 64)
    with pytest.raises(UserError, match=r"s.npz: damaged .npz batch \(Bad CRC-32"):
        list(NpzImages(str(path)).batches(2))
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path))
    with pytest.raises(UserError, match="delete it .* and run again to download it"):
        list(NpzImages(str(path)).batches(2))


def test_serve_refuses_deep_json_non_ascii_digits_and_a_short_body(monkeypatch):
    import asyncio

    from starlette.requests import ClientDisconnect

    from ditlab.serve.app import read_body
    from ditlab.serve.requests import BadRequest, Defaults, Limits, parse_request

    def parse(body: bytes):
        return parse_request(body, [str(i) for i in range(10)], Limits(), Defaults(), ("ddpm",), 4)

    with pytest.raises(BadRequest, match="nested too deeply"):
        parse(b"[" * 100_000 + b"]" * 100_000)
    for digit in ("²", "٣"):
        with pytest.raises(BadRequest, match="unknown class"):
            parse(f'{{"classes": ["{digit}"]}}'.encode())
    assert parse(b'{"classes": [" 3 "], "seed": 1}').classes == [3]

    class ShortBody:
        headers = {"content-length": "100"}

        async def stream(self):
            yield b"{"
            raise ClientDisconnect()

    with pytest.raises(BadRequest, match="closed the connection"):
        asyncio.run(read_body(ShortBody(), 1000))
    from ditlab.serve.batcher import RECENT_BATCHES, Batcher

    batcher = Batcher(lambda *a: None, max_queue=1, max_batch_images=1)
    assert isinstance(batcher.batches, deque) and batcher.batches.maxlen == RECENT_BATCHES


def test_safetensors_weights_carry_a_digest_and_follow_the_umask(tmp_path, make_dit, capsys):
    from safetensors.torch import save_file

    from ditlab.checkpoints.convert import convert
    from ditlab.checkpoints.formats import read_checkpoint

    model = make_dit(in_channels=1)
    src = tmp_path / "run.pt"
    torch.save({"model_config": model.config, "ema": model.state_dict(), "vae": "pixel"}, src)
    old = os.umask(0o022)
    try:
        convert(src, tmp_path / "w.safetensors", "safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors").state_dict["pos_embed"], model.pos_embed)
    weight = model.state_dict()["final_layer.linear.weight"]
    _flip_first(tmp_path / "w.safetensors", weight.contiguous().numpy().tobytes()[:16])
    with pytest.raises(UserError, match="damaged: its weights do not match the SHA-256"):
        read_checkpoint(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "foreign.safetensors"))
    capsys.readouterr()
    read_checkpoint(tmp_path / "foreign.safetensors")
    assert "records no checksum of its weights" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
def test_a_failed_write_names_its_real_errno():
    with pytest.raises(UserWriteError) as e:
        atomic_write_text("/proc/ditlab-test.txt", "x")
    assert "no space" not in str(e.value) and "/proc/ditlab-test.txt" in str(e.value)




def test_the_first_metrics_row_after_a_resume_is_the_uninterrupted_runs(tmp_path):
    """The checkpoint at step 3 keeps the row in progress (steps 1-3 of the row logged at 4), so a run
    resumed from it (the checkpoint at 4 lost, as after a kill) logs the row at 4 bit for bit."""
    import json

    from ditlab.training import TrainConfig, train

    cfg = TrainConfig(data="digits", results=str(tmp_path), model="DiT-S/4", depth=1, hidden_size=32, num_heads=2,
                      image_size=8, global_batch_size=8, num_workers=0, sample_every=0, progress=False,
                      max_steps=4, ckpt_every=3, log_every=4, precision="fp32")
    train(cfg, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "checkpoints" / "step-0000004.pt").unlink()
    train(cfg, device="cpu")
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "mse", "vb", "grad_norm", "lr")
    assert [r["step"] for r in again] == [4]
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]

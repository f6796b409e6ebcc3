"""Downloads by name (`ditlab.hub`) against a real HTTP server on 127.0.0.1: download, cache hit,
an interrupted download resumed with Range, a corrupted file refused and removed, http and
file:// mirrors, the offline error within 2 s, two processes downloading at once."""

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import unpin
from hub_server import FileServer
from serve_helpers import wait_for

import ditlab
from ditlab import hub
from ditlab.errors import UserError
from ditlab.evaluation.batches import save_samples

REPO = Path(__file__).resolve().parents[1]
CKPT = "DiT-XL-2-256x256.pt"
REF = "VIRTUAL_imagenet256_labeled.npz"


def tiny_released_dit(num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A valid "original" state dict (the authors' layout) small enough to serve: 4x4 RGB pixels,
    depth 1, width 64. Its heads are not stored: the released name supplies DiT-XL/2's 16."""
    torch.manual_seed(0)
    model = ditlab.DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=64, depth=1, num_heads=16,
                       num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.state_dict()


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def npz_bytes(images: np.ndarray, path: Path) -> bytes:
    save_samples(str(path), images)
    return path.read_bytes()


def serve_released(tmp_path, monkeypatch) -> FileServer:
    """A mirror on 127.0.0.1 serving a tiny DiT as CKPT and a 5-image batch as REF ($DITLAB_MIRROR set)."""
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    srv = FileServer({CKPT: torch_bytes(tiny_released_dit()), REF: npz_bytes(images, tmp_path / "ref.npz")})
    monkeypatch.setenv("DITLAB_MIRROR", srv.url)
    return srv


@pytest.fixture
def server(cache, tmp_path, monkeypatch):
    srv = serve_released(tmp_path, monkeypatch)
    unpin(monkeypatch, CKPT, REF)  # tiny stand-ins (the pins: test_a_file_unlike_its_name_is_refused_and_removed)
    yield srv
    srv.close()


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.glob(".*") if not p.name.endswith((".lock", ".verified")))


def test_download_verifies_and_the_cache_answers_the_second_time(server, cache):
    path = hub.fetch(CKPT, progress=False)
    assert path == cache / CKPT and path.read_bytes() == server.files[CKPT]
    assert hub.fetch(CKPT, progress=False) == path and server.requests[CKPT] == 1  # cache hit: no request
    assert hub.fetch(REF, progress=False).read_bytes() == server.files[REF]
    assert leftovers(cache) == []  # no .part left behind


def test_a_dropped_connection_is_resumed_with_a_range_request(server, cache):
    server.cut.add(CKPT)
    path = hub.fetch(CKPT, progress=False)
    half = len(server.files[CKPT]) // 2
    assert server.ranges[CKPT] == [None, f"bytes={half}-"] and path.read_bytes() == server.files[CKPT]


def test_a_part_left_by_an_interrupted_run_is_resumed(server, cache):
    cache.mkdir(parents=True)
    (cache / f".{CKPT}.part").write_bytes(server.files[CKPT][:1000])
    assert hub.fetch(CKPT, progress=False).read_bytes() == server.files[CKPT]
    assert server.ranges[CKPT] == ["bytes=1000-"] and leftovers(cache) == []


def test_a_corrupted_file_is_refused_and_removed(server, cache):
    server.files[REF] = b"PK\x03\x04 not really an archive"
    with pytest.raises(UserError) as e:
        hub.fetch(REF, progress=False)
    assert "removed" in str(e.value) and server.url in str(e.value) and "\n" not in str(e.value)
    assert not (cache / REF).exists() and leftovers(cache) == []
    # a pinned SHA-256 prefix: torch-fidelity's Inception weights carry theirs in the name
    server.files[hub.INCEPTION_NAME] = b"x" * 100
    with pytest.raises(UserError, match="does not start with 6726825d"):
        hub.fetch(hub.INCEPTION_NAME, progress=False)
    assert not (cache / hub.INCEPTION_NAME).exists() and leftovers(cache) == []
    server.files[CKPT] = torch_bytes({"weights": torch.zeros(3)})  # a torch file, but not a DiT
    with pytest.raises(UserError, match="not a DiT state dict"):
        hub.fetch(CKPT, progress=False)


def test_structural_checks(tmp_path):
    good = tiny_released_dit(10)
    torch.save(good, tmp_path / "dit.pt")
    hub.check_checkpoint(tmp_path / "dit.pt")
    torch.save({"ema": good, "model": good, "opt": {}}, tmp_path / "train.pt")  # the authors' training layout
    hub.check_checkpoint(tmp_path / "train.pt")
    bad = dict(good, **{"blocks.0.attn.qkv.weight": torch.zeros(3, 64)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="shape"):
        hub.check_checkpoint(tmp_path / "bad.pt")
    save_samples(str(tmp_path / "ok.npz"), np.zeros((2, 4, 4, 3), np.uint8))
    hub.check_reference(tmp_path / "ok.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserError, match="float32"):
        hub.check_reference(tmp_path / "float.npz")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "inception.pth")
    with pytest.raises(UserError, match="keys differ"):
        hub.check_inception(tmp_path / "inception.pth")


def test_mirrors_http_and_file(server, cache, tmp_path, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / CKPT).write_bytes(server.files[CKPT])
    monkeypatch.setenv("DITLAB_MIRROR", folder.as_uri())
    assert hub.fetch(CKPT, progress=False).read_bytes() == server.files[CKPT] and server.requests[CKPT] == 0
    with pytest.raises(UserError) as e:
        hub.fetch(REF, progress=False)
    assert f"the mirror has no {REF}" in str(e.value) and str(cache / REF) in str(e.value)
    monkeypatch.setenv("DITLAB_MIRROR", "ftp://example.org/files")
    with pytest.raises(UserError, match="DITLAB_MIRROR=ftp"):
        hub.fetch(REF, progress=False)
    monkeypatch.setenv("DITLAB_MIRROR", server.url + "/")  # a trailing slash is fine
    server.files.pop(REF)
    with pytest.raises(UserError, match="404"):
        hub.fetch(REF, progress=False)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.mark.parametrize("where", ["offline", "refused", "unrouted"])
def test_no_network_is_one_line_within_2s(cache, monkeypatch, where):
    if where == "offline":
        monkeypatch.setenv("DITLAB_OFFLINE", "1")
        url = hub.RELEASED[CKPT].url
    else:  # the released location, unreachable: a closed port, or TEST-NET-1 (never routed)
        url = closed_port_url() + CKPT if where == "refused" else "http://192.0.2.1/" + CKPT
        monkeypatch.setitem(hub.RELEASED, CKPT, hub.Released(url, "checkpoint", model="DiT-XL/2"))
    started = time.monotonic()
    with pytest.raises(UserError) as e:
        hub.fetch(CKPT, progress=False)
    assert time.monotonic() - started < 2.0
    message = str(e.value)
    assert url in message and f"at {cache / CKPT}" in message and "\n" not in message
    assert not (cache / CKPT).exists()


WORKER = ("import dataclasses, sys; from ditlab import hub; n = sys.argv[1]; "
          "hub.RELEASED[n] = dataclasses.replace(hub.RELEASED[n], implies=None); "  # a tiny stand-in
          "print('ready', flush=True); print(hub.fetch(n, False))")


def test_two_processes_download_once(server, cache):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    server.gate.clear()  # hold the first download until the second process waits for it
    first = subprocess.Popen([sys.executable, "-c", WORKER, CKPT], env=env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: server.waiting[CKPT] == 1, "the first process's request")
    second = subprocess.Popen([sys.executable, "-c", WORKER, CKPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert "waiting for another process downloading" in second.stderr.readline()
    server.gate.set()
    outs = [p.communicate(timeout=60)[0].split() for p in (first, second)]
    assert first.returncode == second.returncode == 0
    assert outs[0] == outs[1] == ["ready", str(cache / CKPT)]
    assert server.requests[CKPT] == 1 and (cache / CKPT).read_bytes() == server.files[CKPT]


def test_the_vae_from_the_hub_fails_fast_and_short_offline(cache, monkeypatch):
    pytest.importorskip("diffusers")
    from ditlab.data.codecs import load_codec

    monkeypatch.setenv("DITLAB_OFFLINE", "1")
    import diffusers  # noqa: F401  (its import time is not the failure's)

    started = time.monotonic()
    with pytest.raises(UserError) as e:
        load_codec("ditlab-tests/no-such-vae")  # in no cache anywhere
    assert time.monotonic() - started < 10.0  # diffusers alone retries for ~25 s without network
    message = str(e.value)
    assert "--vae ditlab-tests/no-such-vae: not in the Hugging Face cache, and DITLAB_OFFLINE is set" in message
    assert "--vae DIR" in message and "\n" not in message

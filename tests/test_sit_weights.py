"""SiT's released weights by name: `SiT-XL-2-256x256.pt` resolves through the downloader (a mirror on
127.0.0.1 serving a tiny state dict in the released layout) and loads strictly into a DiT-XL/2-headed
DiT with learned sigma, which FlowMatching samples."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import unpin
from hub_server import FileServer
from test_hub import torch_bytes

import ditlab
from ditlab import hub
from ditlab.checkpoints.formats import build_model, read_checkpoint

NAME = "SiT-XL-2-256x256.pt"
GOLDEN = Path(__file__).parent / "data" / "golden_sit_reference.npz"


def tiny_released_sit() -> dict[str, torch.Tensor]:
    """A state dict in SiT's released layout (DiT's names, learned sigma: 2C output channels), small
    enough to serve: 4x4x4 latents, depth 1, width 64, 1000 classes. Its heads are not stored."""
    torch.manual_seed(0)
    model = ditlab.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=16,
                       num_classes=1000, learn_sigma=True)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.state_dict()


def test_the_layout_is_sits():
    """The tiny state dict has the keys SiT's own models.py writes (the golden fixture's, depth 2)."""
    with np.load(GOLDEN) as f:
        sit_keys = {k[len("model/") :] for k in f.files if k.startswith("model/")}
    ours = {k.replace("blocks.0.", "blocks.N.") for k in tiny_released_sit()}
    assert ours == {k.replace("blocks.0.", "blocks.N.") for k in sit_keys if not k.startswith("blocks.1.")}


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DITLAB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # no local file of the released name
    unpin(monkeypatch, NAME)  # a tiny stand-in under the released name (its pins: test_hub.py)
    sd = tiny_released_sit()
    srv = FileServer({NAME: torch_bytes(sd)})
    monkeypatch.setenv("DITLAB_MIRROR", srv.url)
    yield srv, sd
    srv.close()


def test_sit_by_name_loads_strictly_and_samples(mirror):
    srv, sd = mirror
    entry = hub.RELEASED[NAME]
    assert entry.kind == "checkpoint" and entry.model == "DiT-XL/2" and entry.objective == "flow"
    assert entry.url.startswith("https://www.dl.dropboxusercontent.com/") and NAME not in entry.url  # SiT's own
    ckpt = read_checkpoint(NAME)
    assert srv.requests[NAME] == 1
    assert ckpt.config["learn_sigma"] and ckpt.config["num_heads"] == 16  # the heads come from the name
    assert ckpt.extra["process"] == {"objective": "flow"}  # and the process: SiT's file samples as flow
    from ditlab.diffusion.protocol import process_from_record

    assert process_from_record(ckpt.extra["process"]).sampler_names[0] == "euler"
    fresh = ditlab.DiT(**ckpt.config)
    fresh.load_state_dict(ckpt.state_dict, strict=True)
    model = build_model(ckpt)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    noise, y = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([207, 360])
    x = ditlab.FlowMatching().sample(model, noise, y=y, steps=2, cfg_scale=1.5, guidance_channels=3)
    assert x.shape == noise.shape and x.isfinite().all()

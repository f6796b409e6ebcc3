"""The guidance interval and autoguidance through the entry points: `ditlab sample` (flags, the guide
loaded through SamplingPipeline and named in the record with its weights digest, one-line errors) and
`ditlab serve` (the request's interval and the server's guide, what the recorded command draws)."""

import json

import numpy as np
import torch

import ditlab
from ditlab.cli import main
from ditlab.diffusion.protocol import PROCESSES
from ditlab.sampling.record import weights_sha256

FAST = ["--steps", "4", "--no-progress", "--device", "cpu", "--precision", "fp32", "--num-samples", "3",
        "--classes", "1", "2", "7"]


SMALL = dict(in_channels=1, hidden_size=64, num_heads=2)  # the fixture's TINY_DIT, narrower


def save_ditlab(path, ema, **extra):
    """A checkpoint laid out as `ditlab train` writes it (digits: pixel space)."""
    torch.save({"ema": ema.state_dict(), "opt": {}, "step": 7, "config": {"data": "digits"},
                "model_config": ema.config, **extra}, path)
    return str(path)


def images(path):
    with np.load(path) as f:
        return f["arr_0"], json.loads(str(f["protocol"]))


def test_sample_with_an_interval_and_a_guide(tmp_path, make_dit):
    main_ckpt = save_ditlab(tmp_path / "main.pt", make_dit(0, **SMALL))
    guide_model = make_dit(1, **{**SMALL, "hidden_size": 32})  # a smaller config: any size
    guide_ckpt = save_ditlab(tmp_path / "guide.pt", guide_model)
    base = ["sample", "--ckpt", main_ckpt, *FAST]
    out = {name: tmp_path / f"{name}.npz" for name in ("plain", "self", "auto", "empty")}
    assert main([*base, "--out", str(out["plain"])]) == 0
    assert main([*base, "--out", str(out["self"]), "--cfg-scale", "3", "--guide-ckpt", main_ckpt]) == 0
    assert main([*base, "--out", str(out["auto"]), "--cfg-scale", "3", "--guide-ckpt", guide_ckpt,
                 "--guidance-interval", "0.5", "inf"]) == 0
    assert main([*base, "--out", str(out["empty"]), "--cfg-scale", "3", "--guidance-t", "2000", "3000"]) == 0
    plain, _ = images(out["plain"])
    assert np.array_equal(images(out["self"])[0], plain)  # a guide equal to the main model: unguided
    assert np.array_equal(images(out["empty"])[0], plain)  # no step in the interval: unguided
    auto, record = images(out["auto"])
    assert not np.array_equal(auto, plain)
    assert record["guidance_interval"] == [0.5, float("inf")] and record["guidance_t"] is None
    assert record["guide"]["weights_sha256"] == weights_sha256(guide_model.state_dict())
    assert record["guide"]["model_config"]["hidden_size"] == 32 and record["guide"]["checkpoint"] == guide_ckpt
    assert images(out["empty"])[1]["guide"] is None


def test_bad_guidance_flags_are_one_line_errors(tmp_path, make_dit, capsys, monkeypatch):
    monkeypatch.setitem(PROCESSES, "flow", ditlab.FlowMatching.from_record)
    main_ckpt = save_ditlab(tmp_path / "main.pt", make_dit(0, **SMALL))
    other = {"channels": save_ditlab(tmp_path / "c.pt", make_dit(1, **{**SMALL, "in_channels": 2})),
             "size": save_ditlab(tmp_path / "s.pt", make_dit(1, **SMALL, input_size=4)),
             "flow": save_ditlab(tmp_path / "f.pt", make_dit(1, **SMALL), process={"objective": "flow"}),
             "classes": save_ditlab(tmp_path / "k.pt", make_dit(1, **SMALL, num_classes=3))}
    base = ["sample", "--ckpt", main_ckpt, *FAST, "--out", str(tmp_path / "x.npz")]
    cases = [
        (["--guidance-interval", "2", "1"], "--guidance-interval: guidance interval LO HI in sigma needs 0 <= LO"),
        (["--guidance-interval", "nan", "1"], "--guidance-interval"),
        (["--guidance-t", "0.9", "0.1"], "--guidance-t: guidance t interval LO HI needs finite LO <= HI"),
        (["--guidance-t", "0", "1", "--guidance-interval", "0", "1"], "not both"),
        (["--guide-ckpt", main_ckpt], "give W != 1"),
        (["--cfg-scale", "2", "--guide-ckpt", other["channels"]], "2-channel 8x8 latents"),
        (["--cfg-scale", "2", "--guide-ckpt", other["size"]], "1-channel 4x4 latents"),
        (["--cfg-scale", "2", "--guide-ckpt", other["flow"]], "its objective is 'flow'"),
        (["--cfg-scale", "2", "--guide-ckpt", other["classes"]], "3 classes"),
        (["--cfg-scale", "2", "--guide-ckpt", str(tmp_path / "missing.pt")], "missing.pt"),
    ]
    for flags, needle in cases:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x.npz").exists()


def test_serve_offers_the_interval_and_the_servers_guide(tmp_path, make_dit):
    """A request with an interval and autoguidance gives what its recorded `ditlab sample` command draws."""
    import io

    import pytest

    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from PIL import Image
    from serve_helpers import LiveServer

    from ditlab.serve.app import create_app
    from ditlab.serve.engine import Engine
    from ditlab.serve.requests import BadRequest, Defaults, Limits, parse_request

    main_ckpt = save_ditlab(tmp_path / "main.pt", make_dit(0, **SMALL))
    guide_ckpt = save_ditlab(tmp_path / "guide.pt", make_dit(1, **{**SMALL, "hidden_size": 32}))
    engine = Engine(main_ckpt, device="cpu", precision="fp32", guide_ckpt=guide_ckpt)
    server = LiveServer(create_app(engine, Limits(), Defaults(steps=3, per_class=1), window_s=0.0).app)
    try:
        assert json.loads(server.request("GET", "/api/info")[2])["guide"] == guide_ckpt
        status, headers, png = server.sample(classes=[2, 5], per_class=1, seed=3, steps=3, cfg_scale=2.5,
                                             guidance_interval=[0.5, None], guide=True)
    finally:
        server.close()
    assert status == 200, png
    record = json.loads(headers["x-ditlab-record"])
    assert record["guide"]["checkpoint"] == guide_ckpt and record["guidance_interval"] == [0.5, float("inf")]
    argv = record["command"].split()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "grid.png")
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid, np.asarray(Image.open(io.BytesIO(png))))  # same batch, same kernels: bitwise
    bad = [({"guide": True}, "guide: this server has no guide model"),
           ({"guidance_interval": [3, 1]}, "guidance_interval: guidance interval LO HI in sigma needs 0 <= LO <= HI"),
           ({"guidance_t": [0.5]}, "guidance_t: [0.5] is not [lo, hi]"),
           ({"guidance_interval": [0, 1], "guidance_t": [0, 1]}, "not both")]
    for body, message in bad:
        with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_request(json.dumps({"classes": [1], **body}).encode(), ["0", "1"], Limits(), Defaults(), ("ddpm",),
                          1, has_guide=False)


GUIDED_SPEC = """
name = "guided"
[data]
data = "digits"
image_size = 8
[train]
eval_steps = [2, 4]
global_batch_size = 16
[sizes]
T = { depth = 1, hidden_size = 32, num_heads = 2 }
[[grid]]
sizes = ["T"]
patch_sizes = [4]
[eval]
metric = "digits"
num_samples = 10
seeds = [0]
steps = 8
cfg_scales = [1.0, 2.0]
guidance_intervals = [[0, inf], [0.5, 3.0]]
guide_steps = [0, 2]
[sweep]
entries = ["DiT-T-4"]
steps = [4]
cfg_scale = 2.0
guidance_interval = [0.5, 3.0]
guide_step = 2
"""


def test_study_varies_the_interval_and_the_guide(tmp_path, monkeypatch):
    """[eval] crosses scales, intervals and guides (a guide only at later points; scale 1 once); the runner
    hands them to `ditlab sample` with the entry's earlier checkpoint as the guide, and counts the guided steps."""
    import pytest

    from ditlab.sampling import run as sample_run
    from ditlab.study.runner import evaluate_point
    from ditlab.study.spec import load_spec

    path = tmp_path / "guided.toml"
    path.write_text(GUIDED_SPEC)
    study = load_spec(path)
    at2, at4 = study.settings("DiT-T-4", 2), study.settings("DiT-T-4", 4)
    assert [s.key for s in at2] == ["ddpm-8-cfg1-n10-random-seed0", "ddpm-8-cfg2-n10-random-seed0-gi0-inf",
                                    "ddpm-8-cfg2-n10-random-seed0-gi0.5-3"]
    assert len(at4) == 1 + 2 * 2 + 1 and at4[-1].key == "ddpm-4-cfg2-n10-random-seed0-gi0.5-3-guide2"
    calls = []
    monkeypatch.setattr(sample_run, "sample_to_files", lambda ckpt, out, **kw: calls.append((ckpt, kw)))
    folder = tmp_path / "study" / "DiT-T-4"
    (folder / "run" / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        (folder / "run" / "checkpoints" / f"step-{step:07d}.pt").write_bytes(b"")
    info = type("Info", (), {"is_main": True})()
    monkeypatch.setattr("ditlab.study.runner.barrier", lambda: None)
    setting = at4[-2]  # cfg 2, (0.5, 3], guided by step 2
    assert evaluate_point(study.entries["DiT-T-4"], study, folder, 4, setting, lambda npz: {"fd": 1.0}, info, "cpu",
                          False)  # fmt: skip
    (ckpt, kw), = calls
    assert ckpt.endswith("step-0000004.pt") and kw["guide_ckpt"].endswith("step-0000002.pt")
    assert kw["guidance_interval"] == [0.5, 3.0] and kw["cfg_scale"] == 2.0
    row = json.loads((folder / "evals" / "step-0000004" / f"{setting.key}.json").read_text())
    ab = ditlab.Diffusion().respace(8).alphas_cumprod
    assert row["guided_steps"] == int((((1 - ab) / ab).sqrt() > 0.5).logical_and(((1 - ab) / ab).sqrt() <= 3).sum())
    for bad, message in ((("guide_steps = [0, 2]", "guide_steps = [3]"), "guide must be a checkpoint at an evaluation"),
                         (("[0.5, 3.0]]", "[3.0, 0.5]]"), "must be \\[lo, hi\\] with 0 <= lo <= hi")):
        path.write_text(GUIDED_SPEC.replace(*bad))
        with pytest.raises(ValueError, match=message):
            load_spec(path)

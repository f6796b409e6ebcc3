"""Flow matching everywhere a process is used: `ditlab train --objective flow` (resume, gradient
accumulation, the non-finite guard), the checkpoint's record of its objective, and `ditlab sample` /
`ditlab convert` following it. Tiny configs on the bundled digits, on CPU."""

import json

import numpy as np
import pytest
import torch
from test_training import run_cfg, weights

from ditlab.cli import main
from ditlab.diffusion import Diffusion, FlowMatching
from ditlab.diffusion.protocol import process_from_record
from ditlab.training import TrainConfig, train
from ditlab.training.resume import config_differences

FLOW = dict(objective="flow", time_sampling="logit-normal", time_location=0.2, learn_sigma=True)
FAST = ["--no-progress", "--device", "cpu", "--num-samples", "3"]


def test_a_flow_run_resumes_bit_for_bit_with_grad_accum_and_records_its_objective(tmp_path):
    kw = dict(max_steps=6, ckpt_every=3, log_every=3, lr=1e-4, **FLOW)
    train(run_cfg(tmp_path / "k2", grad_accum=2, **kw), device="cpu")
    train(run_cfg(tmp_path / "r2", grad_accum=2, **{**kw, "max_steps": 3}), device="cpu")
    train(run_cfg(tmp_path / "r2", grad_accum=2, **kw), device="cpu")  # the same command, extended
    train(run_cfg(tmp_path / "k1", **kw), device="cpu")
    a, b, c = (weights(tmp_path / m) for m in ("k2", "r2", "k1"))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part  # resumed: bit for bit
        assert all(torch.allclose(a[part][k], c[part][k], rtol=0, atol=5e-5) for k in a[part]), part  # K = 1
    assert a["config"]["objective"] == "flow" and a["config"]["time_sampling"] == "logit-normal"
    assert a["model_config"]["learn_sigma"] and a["ema"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 2 * 1
    rows = [json.loads(line) for line in (tmp_path / "k2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(r["loss"] > 0 and "mse" not in r for r in rows)
    process = process_from_record(a["config"])  # what sampling builds from the checkpoint
    assert isinstance(process, FlowMatching) and process.time_location == 0.2
    assert process.to_record() == FlowMatching(time_sampling="logit-normal", time_location=0.2).to_record()


def test_objective_settings_their_defaults_and_old_runs():
    flow, ddpm = TrainConfig(data="d", results="r", objective="flow"), TrainConfig(data="d", results="r")
    assert (flow.learn_sigma, ddpm.learn_sigma) == (False, True)  # SiT's half unused; the paper's variance
    assert isinstance(process_from_record(ddpm.process_record()), Diffusion)
    old = {k: v for k, v in ddpm.to_dict().items() if k not in ("objective", "time_sampling", "path")}
    assert config_differences(old, ddpm) == []  # a run stored before there were objectives resumes
    assert "objective: 'ddpm' -> 'flow'" in config_differences(old, flow)
    assert process_from_record({k: v for k, v in old.items()}).objective == "ddpm"
    with pytest.raises(ValueError, match="^--time-sampling sets a flow: it needs --objective flow$"):
        TrainConfig(data="d", results="r", time_sampling="logit-normal")
    with pytest.raises(ValueError, match="^--time-scale -1.0 must be a positive finite number$"):
        TrainConfig(data="d", results="r", objective="flow", time_scale=-1.0)


def test_a_non_finite_flow_step_leaves_weights_ema_and_optimizer_untouched():
    from ditlab.models import create_model
    from ditlab.training.ema import make_ema
    from ditlab.training.parallel import make_optimizer
    from ditlab.training.step import TrainStep

    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2,
                         learn_sigma=False)  # fmt: skip
    ema, opt = make_ema(model), make_optimizer(model, 1e-3, torch.device("cpu"))
    fm = FlowMatching()
    step = TrainStep(model, ema, opt, fm, None, torch.device("cpu"), 0.9)
    g = torch.Generator().manual_seed(0)
    x1, noise, y = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g), torch.arange(4)
    t = fm.sample_timesteps(4, generator=g)
    assert not step(x1, t, y, noise)[2]
    before = [p.clone() for p in [*model.parameters(), *ema.parameters()]]
    state = [v.clone() for s in opt.state.values() for v in s.values()]
    x1[0, 0, 0, 0] = float("inf")
    terms, norm, bad = step(x1, t, y, noise)
    assert bad and not torch.isfinite(terms["loss"]).all()
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *ema.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(state, [v for s in opt.state.values() for v in s.values()]))


@pytest.fixture
def flow_ckpt(tmp_path, make_dit):
    """A ditlab checkpoint of a flow run (a pixel-space model: the digits' layout)."""
    model = make_dit(in_channels=1, learn_sigma=False)
    cfg = TrainConfig(data="digits", results="r", objective="flow", path="gvp")
    path = tmp_path / "flow.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "step": 1, "config": cfg.to_dict(),
                "model_config": model.config, "vae": "pixel"}, path)
    return str(path)


def sample(tmp_path, ckpt, name, *flags):
    out = tmp_path / f"{name}.npz"
    assert main(["sample", "--ckpt", ckpt, "--out", str(out), *FAST, *flags]) == 0
    with np.load(out) as f:
        return f["arr_0"], json.loads(str(f["protocol"]))


def test_a_flow_checkpoint_samples_through_every_sampler_and_records_it(tmp_path, flow_ckpt):
    pytest.importorskip("torchdiffeq")
    images = {}
    for sampler in ("euler", "heun", "sde-euler", "sde-heun", "dopri5"):
        images[sampler], record = sample(tmp_path, flow_ckpt, sampler, "--sampler", sampler, "--steps", "3")
        assert (record["sampler"], record["steps"]) == (sampler, 3)
        assert record["process"]["objective"] == "flow" and record["process"]["path"] == "gvp"
    assert len({a.tobytes() for a in images.values()}) == 5  # five integrators, five results
    _, record = sample(tmp_path, flow_ckpt, "default", "--steps", "2")
    assert record["sampler"] == "euler"  # the process's default


def test_a_sampler_of_the_other_objective_is_refused_in_one_line(tmp_path, flow_ckpt, make_dit, capsys):
    from test_sample import save_ditlab

    ddpm_ckpt = save_ditlab(tmp_path / "ddpm.pt", make_dit(in_channels=1))
    for ckpt, sampler, msg in [(flow_ckpt, "ddim", "--sampler ddim is a ddpm sampler, but .* is a flow checkpoint: "
                                                   "choose one of euler, heun, sde-euler, sde-heun, dopri5"),
                               (ddpm_ckpt, "heun", "--sampler heun is a flow sampler, but .* is a ddpm checkpoint: "
                                                   "choose one of ddpm, ddim, dpm\\+\\+2m")]:  # fmt: skip
        out = tmp_path / "x.npz"
        assert main(["sample", "--ckpt", ckpt, "--out", str(out), *FAST, "--sampler", sampler]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pytest.importorskip("re").search(msg, err), err
        assert not out.exists()


def test_convert_keeps_the_objective_where_the_format_can_and_sample_names_it_where_not(tmp_path, flow_ckpt,
                                                                                        capsys):  # fmt: skip
    ref, _ = sample(tmp_path, flow_ckpt, "ref", "--steps", "2")
    st, pt = str(tmp_path / "flow.safetensors"), str(tmp_path / "authors.pt")
    assert main(["convert", flow_ckpt, st, "--to", "safetensors"]) == 0
    assert "warning" not in capsys.readouterr().err
    images, record = sample(tmp_path, st, "st", "--steps", "2", "--vae", "pixel")
    assert np.array_equal(images, ref) and record["process"]["path"] == "gvp"
    assert main(["convert", flow_ckpt, pt, "--to", "original"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"ditlab convert: warning: the original format cannot record objective 'flow': sample {pt} with "
                   "`ditlab sample --objective flow`")
    _, record = sample(tmp_path, pt, "as-ddpm", "--steps", "2", "--vae", "pixel")
    assert record["process"]["objective"] == "ddpm" and record["sampler"] == "ddpm"  # what a plain state dict reads as
    images, record = sample(tmp_path, pt, "named", "--steps", "2", "--vae", "pixel",
                            "--objective", "flow")  # fmt: skip
    assert record["process"]["objective"] == "flow" and record["sampler"] == "euler" and np.array_equal(images, ref)
    assert main(["sample", "--ckpt", flow_ckpt, "--out", str(tmp_path / "y.npz"), *FAST, "--objective", "ddpm"]) == 2
    assert capsys.readouterr().err.strip().endswith("records objective 'flow'")


def test_serve_offers_the_checkpoints_samplers_and_records_what_sample_redraws(tmp_path, flow_ckpt):
    pytest.importorskip("starlette")
    from ditlab.serve.engine import Engine
    from ditlab.serve.record import sample_record
    from ditlab.serve.requests import Defaults, SampleRequest

    engine = Engine(flow_ckpt, device="cpu", precision="fp32")
    info = engine.info()
    assert info["objective"] == "flow" and info["samplers"] == ["euler", "heun", "sde-euler", "sde-heun", "dopri5"]
    assert engine.defaults_for(Defaults()).sampler == "euler"
    with pytest.raises(ValueError, match="^--sampler ddpm is a ddpm sampler, but .* is a flow checkpoint"):
        engine.defaults_for(Defaults(sampler="ddpm"))
    request = SampleRequest(classes=[3], per_class=2, cfg_scale=1.0, sampler="sde-euler", steps=2, seed=5)
    (served,) = engine.run([request])
    record = sample_record(engine.meta, {"classes": [3], "per_class": 2, "cfg_scale": 1.0, "sampler": "sde-euler",
                                         "steps": 2, "seed": 5})  # fmt: skip
    assert record["process"]["objective"] == "flow" and "--objective flow" in record["command"]
    argv = record["command"].split()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again.npz")
    assert main([*argv[: argv.index("--nrow")], *argv[argv.index("--nrow") + 2 :], "--no-progress", "--device",
                 "cpu"]) == 0  # fmt: skip
    with np.load(tmp_path / "again.npz") as f:
        assert np.array_equal(f["arr_0"], served)  # the same batch of 2, the same per-image SDE noise

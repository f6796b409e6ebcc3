import subprocess
import sys

from ditlab.cli import main


def test_flops_table(capsys):
    assert main(["flops"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("DiT-XL/2 "))
    assert row.split() == ["DiT-XL/2", "675.1M", "256", "118.62"]
    assert len([line for line in out.splitlines() if line.startswith("DiT-")]) == 12


def test_flops_bad_size_is_one_line_error(capsys):
    assert main(["flops", "--image-size", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--image-size 100" in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "ditlab", "--help"], capture_output=True, text=True, check=True)
    assert "flops" in out.stdout


def test_building_every_parser_imports_no_torch():
    """`ditlab --help` and every subcommand's --help stay instant: the parser is built from light
    config modules, the library (and torch) load only when a subcommand runs."""
    code = ("import sys; from ditlab.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flags_come_from_the_config_fields_with_their_docstrings():
    import dataclasses

    from ditlab.cli import build_parser
    from ditlab.data.config import ExtractConfig
    from ditlab.flags import field_docs
    from ditlab.sampling.config import SampleConfig
    from ditlab.training.config import TrainConfig

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for command, cls in (("train", TrainConfig), ("sample", SampleConfig), ("extract-latents", ExtractConfig)):
        docs = field_docs(cls)
        actions = {a.dest: a for a in subs[command]._actions}
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            action = actions[f.name]
            assert action.help.startswith(docs[f.name]), (command, f.name)
            if f.default is not dataclasses.MISSING:
                assert action.default == f.default, (command, f.name)
    # the flag names and defaults of the paper's recipe
    args = subs["train"].parse_args(["--data", "d", "--results", "r"])
    assert (args.model, args.global_batch_size, args.lr, args.ema_decay, args.objective, args.learn_sigma) == \
        ("DiT-XL/2", 256, 1e-4, 0.9999, "ddpm", None)  # learn_sigma None: the objective's (ddpm: on)
    assert subs["train"].parse_args(["--data", "d", "--results", "r", "--no-learn-sigma"]).learn_sigma is False
    assert subs["train"].parse_args(["--data", "d", "--results", "r", "--learn-sigma"]).learn_sigma is True
    args = subs["sample"].parse_args(["--ckpt", "c", "--out", "o.png", "--classes", "1", "2", "--no-progress"])
    assert (args.classes, args.steps, args.sampler, args.cfg_scale, args.progress) == \
        (["1", "2"], None, None, 1.0, False)  # --classes: resolved once the checkpoint is read; the sampler and
    # steps default to the checkpoint's process's (ddpm 250 steps, the paper's; flow euler 250)


def test_the_light_choices_are_the_registries():
    import ditlab.options as options
    from ditlab.checkpoints.formats import WRITERS
    from ditlab.data.latents import STORAGE_DTYPES
    from ditlab.diffusion import SAMPLERS, flow
    from ditlab.diffusion.flow_matching import SAMPLERS as FLOW_SAMPLERS
    from ditlab.diffusion.protocol import PROCESSES
    from ditlab.models import BLOCKS
    from ditlab.runtime.precision import AMP_DTYPES

    assert options.SAMPLERS == tuple(SAMPLERS) and options.BLOCKS == tuple(BLOCKS)
    assert options.FLOW_SAMPLERS == FLOW_SAMPLERS and options.OBJECTIVES == tuple(PROCESSES)
    assert all(PROCESSES[o]({}).sampler_names == s for o, s in options.OBJECTIVE_SAMPLERS.items())
    assert (options.FLOW_PATHS, options.FLOW_PREDICTIONS, options.FLOW_LOSS_WEIGHTS, options.TIME_SAMPLINGS) == \
        (flow.PATHS, flow.PREDICTIONS, flow.LOSS_WEIGHTS, flow.TIME_SAMPLINGS)
    assert options.FORMATS == tuple(WRITERS) and options.LATENT_DTYPES == tuple(STORAGE_DTYPES)
    assert options.PRECISIONS == ("auto", *AMP_DTYPES)


def test_a_bug_is_a_traceback_and_a_user_error_one_line(monkeypatch, capsys):
    import pytest

    import ditlab.models.flops as flops

    assert main(["flops", "--image-size", "-8"]) == 2  # the user's mistake: one line
    assert capsys.readouterr().err.count("\n") == 1

    def broken(*args, **kwargs):
        raise ValueError("a bug inside ditlab")

    monkeypatch.setattr(flops, "flops_table", broken)
    with pytest.raises(ValueError, match="a bug inside ditlab"):  # not swallowed as a user error
        main(["flops"])

"""`ditlab study` with several objectives: the grid varies the objective and flow's settings, every entry
is sampled by its own process, and the report sets the objectives side by side."""

import json
from pathlib import Path

import pytest
from test_study import write_spec

from ditlab.study.objectives import objective_tables
from ditlab.study.results import block_entries, grid_entries, load_rows, seed_pairs
from ditlab.study.spec import load_spec

GRIDS = """[[grid]]
sizes = ["T"]
patch_sizes = [2]
objectives = ["ddpm", "flow"]
seeds = [0, 1]
[[grid]]
sizes = ["T"]
patch_sizes = [2]
objectives = ["flow"]
flow = { time_sampling = "logit-normal", time_scale = 0.5 }
"""


def objectives_spec(tmp_path: Path, edit: tuple[str, str] = ("", "")) -> Path:
    path = write_spec(tmp_path)
    text = path.read_text().replace('[[grid]]\nsizes = ["T"]\npatch_sizes = [2, 4]\n', GRIDS)
    text = text.replace("steps = 3\n", "steps = 3\nflow_sampler = \"heun\"\nflow_steps = 2\n", 1)
    path.write_text(text.replace('entries = ["DiT-T-2"]', 'entries = ["DiT-T-2", "DiT-T-2-flow"]').replace(*edit))
    return path


def test_the_grid_varies_the_objective_and_each_entry_samples_by_its_own_process(tmp_path):
    study = load_spec(objectives_spec(tmp_path))
    assert list(study.entries) == ["DiT-T-2", "DiT-T-2-flow", "DiT-T-2-seed1", "DiT-T-2-flow-seed1",
                                   "DiT-T-2-flow-logit-normal-time-scale0.5"]
    lognorm = study.entries["DiT-T-2-flow-logit-normal-time-scale0.5"]
    cfg = lognorm.train_config(tmp_path / "run", max_steps=4, progress=False)
    assert (cfg.objective, cfg.time_sampling, cfg.time_scale, cfg.learn_sigma) == ("flow", "logit-normal", 0.5, False)
    assert study.entries["DiT-T-2"].train_config(tmp_path, 4, False).objective == "ddpm"
    keys = {n: [s.key for s in study.settings(n, 4)] for n in ("DiT-T-2", "DiT-T-2-flow", "DiT-T-2-flow-seed1")}
    assert keys["DiT-T-2"][0].startswith("ddpm-3-") and keys["DiT-T-2-flow"][0].startswith("heun-2-")
    assert [k.split("-cfg")[0] for k in keys["DiT-T-2-flow"][2:]] == ["heun-3"]  # the sweep's, by the flow sampler
    assert len(keys["DiT-T-2-flow-seed1"]) == 2  # not in the sweep: the two sample seeds only


@pytest.mark.parametrize("edit, message", [
    (('objectives = ["flow"]', 'objectives = ["flowz"]'), r"objectives \['flowz'\]"),
    (('time_scale = 0.5', 'time_scal = 0.5'), r"flow: unknown key 'time_scal'"),
    (('time_scale = 0.5', 'time_scale = -1.0'), r"--time-scale -1.0 must be a positive finite number"),
    (('flow_sampler = "heun"', 'flow_sampler = "ddim"'), r"flow_sampler 'ddim': a flow sampler, one of euler"),
])  # fmt: skip
def test_objective_mistakes_are_one_line_errors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_spec(objectives_spec(tmp_path, edit))


def test_the_shipped_objectives_spec_parses():
    study = load_spec(Path(__file__).parents[1] / "studies" / "objectives-digits.toml")
    objectives = {n: (e.objective, e.train.get("time_sampling", "uniform")) for n, e in study.entries.items()}
    assert sorted(set(objectives.values())) == [("ddpm", "uniform"), ("flow", "logit-normal"), ("flow", "uniform")]
    assert len(objectives) == 6 and set(study.sweep.entries) == set(objectives)
    assert {e.train["global_batch_size"] for e in study.entries.values()} == {64}  # equal training compute


def test_the_report_sets_the_objectives_side_by_side(tmp_path):
    """A study folder written by hand: two objectives, two training seeds each, a sweep at the last point."""
    study = load_spec(objectives_spec(tmp_path))
    out = tmp_path / "s"
    entries = {n: {"size": e.size, "patch_size": e.patch_size, "block": e.block, "seed": e.seed, "train": e.train}
               for n, e in study.entries.items() if "logit" not in n}  # fmt: skip
    sweep = {"entries": ["DiT-T-2", "DiT-T-2-flow"], "steps": [2, 3], "sampler": "ddpm", "flow_sampler": "heun",
             "cfg_scale": 1.0, "seeds": [0], "num_samples": 20}  # fmt: skip
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"name": "x", "eval_steps": [2, 4], "entries": entries, "sweep": sweep,
                                                "eval": {**study.to_dict()["eval"], "seeds": [0]}}))  # fmt: skip
    # (entry, train step, sampler, sampling steps) -> distance
    values = {("DiT-T-2", 2, "ddpm", 3): 9.0, ("DiT-T-2", 4, "ddpm", 3): 5.0, ("DiT-T-2-seed1", 4, "ddpm", 3): 7.0,
              ("DiT-T-2-flow", 4, "heun", 2): 4.0, ("DiT-T-2-flow-seed1", 4, "heun", 2): 4.4,
              ("DiT-T-2", 4, "ddpm", 2): 20.0, ("DiT-T-2-flow", 4, "heun", 3): 3.9}  # fmt: skip
    for name, e in entries.items():
        (out / name).mkdir()
        (out / name / "entry.json").write_text(json.dumps({**e, "objective": e["train"]["objective"], "depth": 1,
                                                           "hidden_size": 32, "num_heads": 2, "tokens": 16,
                                                           "params": 10, "gflops": 1.0, "global_batch_size": 16}))
    for (name, step, sampler, steps), value in values.items():
        path = out / name / "evals" / f"step-{step:07d}" / f"{sampler}-{steps}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"entry": name, "step": step, "sampler": sampler, "steps": steps, "cfg_scale": 1.0,
                                    "num_samples": 20, "labels": "balanced", "seed": 0,
                                    "metrics": {"frechet_distance": value}}))  # fmt: skip
    stored, rows = load_rows(out)
    assert grid_entries(stored) == ["DiT-T-2"] and block_entries(stored) == []  # the paper's analysis: DDPM only
    assert seed_pairs(stored) == [("DiT-T-2", "DiT-T-2-seed1"), ("DiT-T-2-flow", "DiT-T-2-flow-seed1")]
    lines = objective_tables(stored, rows, "frechet_distance")
    assert lines[2] == "| DiT-T-2 | ddpm | ddpm 3 | 9 | 6 (5 / 7) |"
    assert lines[3] == "| DiT-T-2-flow | flow | heun 2 |  | 4.2 (4 / 4.4) |"
    assert lines[7] == "| DiT-T-2 | ddpm | 20 | 6 (5 / 7) | 3 |"  # 20 at 2 steps: 3 steps needed
    assert lines[8] == "| DiT-T-2-flow | heun | 4.2 (4 / 4.4) | 3.9 | 2 |"  # 4.2 is within 10% of 3.9

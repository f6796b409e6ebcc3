"""`ditlab study` as an ablation: entries named from their differences to a declared baseline, trained
at equal training compute, guidance compared on the last checkpoints, and what each entry buys."""

import json
from pathlib import Path

import pytest
import torch
from test_repa_training import tiny_dinov2_file
from test_study import write_spec

from ditlab.models import DiT, count_gflops
from ditlab.study.ablation import ablation_results, compute_to_reach
from ditlab.study.report import write_report
from ditlab.study.results import load_rows
from ditlab.study.runner import run_study
from ditlab.study.spec import load_spec

GRIDS = """[[grid]]
sizes = ["T"]
patch_sizes = [2]
seeds = [0, 1]
[[grid]]
sizes = ["T"]
patch_sizes = [2]
objectives = ["flow"]
flow = { time_sampling = "logit-normal" }
[[grid]]
sizes = ["T"]
patch_sizes = [2]
norms = ["rmsnorm"]
mlps = ["swiglu"]
[[grid]]
sizes = ["T"]
patch_sizes = [2]
positions = ["sincos+rope"]
[[grid]]
sizes = ["T"]
patch_sizes = [4]
"""
REPA_GRID = """[[grid]]
sizes = ["T"]
patch_sizes = [2]
repa = {{ encoder = "{path}", depth = 1, width = 16 }}
"""
TAIL = """[ablation]
baseline = "DiT-T-2"
[final]
entries = ["DiT-T-2"]
cfg_scales = [1.5]
guide_steps = [0, 2]
guide_entries = ["DiT-T-4"]
"""


def ablation_spec(tmp_path: Path, repa: bool = False, edit: tuple[str, str] = ("", "")) -> Path:
    path = write_spec(tmp_path)
    grids = GRIDS + (REPA_GRID.format(path=tmp_path / "dino.pth") if repa else "")
    text = path.read_text().replace('[[grid]]\nsizes = ["T"]\npatch_sizes = [2, 4]\n', grids)
    text = text.replace("[sweep]", TAIL + "[sweep]").replace("steps = 3\n", "steps = 3\nflow_steps = 2\n", 1)
    path.write_text(text.replace(*edit))
    return path


def test_names_read_as_ablations_and_every_point_is_at_the_baselines_compute(tmp_path):
    tiny_dinov2_file(tmp_path / "dino.pth")  # its 224 px input costs ~20 tiny DiTs: REPA's points need room
    path = ablation_spec(tmp_path, repa=True)
    path.write_text(path.read_text().replace("eval_steps = [2, 4]", "eval_steps = [40, 80]").replace(
        "guide_steps = [0, 2]", "guide_steps = [0, 40]"))
    study = load_spec(path)
    assert list(study.entries) == ["DiT-T-2", "DiT-T-2-seed1", "DiT-T-2+flow+logit-normal", "DiT-T-2+rmsnorm+swiglu",
                                   "DiT-T-2+rope", "DiT-T-4", "DiT-T-2+repa"]
    assert study.entries["DiT-T-2+rope"].options == {"pos": "sincos+rope"}
    assert study.entries["DiT-T-2+repa"].train["repa_encoder"] == str(tmp_path / "dino.pth")
    costs = study.ablation["train_gflops_per_image"]
    # independently: the DiTs counted from models built here; the projector by hand (16 tokens, 32 -> 16 -> 16 -> 64)
    kinds = {"DiT-T-2": {}, "DiT-T-4": {"patch_size": 4},
             "DiT-T-2+rmsnorm+swiglu": {"mlp": "swiglu", "norm": "rmsnorm"}}
    for name, kw in kinds.items():
        with torch.device("meta"):
            model = DiT(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2, **kw)
        assert costs[name]["dit"] == pytest.approx(count_gflops(model), rel=1e-12)
        assert costs[name]["total"] == pytest.approx(3 * costs[name]["dit"], rel=1e-12)
    assert costs["DiT-T-2+repa"]["projector"] == pytest.approx(16 * (32 * 16 + 16 * 16 + 16 * 64) / 1e9, rel=1e-12)
    repa = costs["DiT-T-2+repa"]
    assert repa["encoder"] > 0 and repa["dit"] == costs["DiT-T-2"]["dit"]
    assert repa["total"] == pytest.approx(3 * (repa["dit"] + repa["projector"]) + repa["encoder"], rel=1e-12)
    path.write_text(path.read_text().replace('baseline = "DiT-T-2"', 'baseline = "DiT-T-2"\ncount_encoder = false'))
    cached = load_spec(path).ablation["train_gflops_per_image"]["DiT-T-2+repa"]  # features cached: no encoder per step
    assert cached["total"] == pytest.approx(3 * (repa["dit"] + repa["projector"]), rel=1e-12)
    base = costs["DiT-T-2"]["total"]
    for name, e in study.entries.items():
        steps = study.steps_of(name)
        assert len(steps) == 2 and steps == (e.eval_steps or study.eval_steps)
        for own, at_base in zip(steps, study.eval_steps):  # equal compute, to the rounding of one step
            assert abs(own * costs[name]["total"] - at_base * base) <= costs[name]["total"] / 2 + 1e-15
    assert study.steps_of("DiT-T-4")[-1] > 80 > study.steps_of("DiT-T-2+repa")[-1]  # cheaper: more steps, and fewer
    # [final]: guidance on the baseline's last checkpoint only, its own earlier point or another entry as the guide
    keys = [s.key for s in study.settings("DiT-T-2", 80)]
    assert "ddpm-3-cfg1.5-n20-balanced-seed0-guide40" in keys and "ddpm-3-cfg1.5-n20-balanced-seed1" in keys
    assert "ddpm-3-cfg1.5-n20-balanced-seed0-guide-DiT-T-4" in keys
    t4 = study.steps_of("DiT-T-4")
    assert not any("cfg1.5" in s.key for s in study.settings("DiT-T-2", 40) + study.settings("DiT-T-4", t4[-1]))


@pytest.mark.parametrize("edit, message", [
    (('baseline = "DiT-T-2"', 'baseline = "DiT-T-8"'), r"\[ablation\]: baseline 'DiT-T-8' is not an entry"),
    (('baseline = "DiT-T-2"', 'baselin = "DiT-T-2"'), r"\[ablation\]: unknown key 'baselin'"),
    (('baseline = "DiT-T-2"', 'baseline = "DiT-T-2"\ncount_encoder = 1'), r"count_encoder 1 must be true or false"),
    (('guide_entries = ["DiT-T-4"]', 'guide_entries = ["DiT-T-2+flow+logit-normal"]'),
     r"\[final\]: guide_entries: DiT-T-2\+flow\+logit-normal \(flow\) can guide none of the entries \(DiT-T-2\)"),
    (('entries = ["DiT-T-2"]\ncfg', 'entries = ["DiT-T-9"]\ncfg'), r"\[final\]: entries: 'DiT-T-9' is not an entry"),
    (('norms = ["rmsnorm"]\nmlps = ["swiglu"]', 'repa = { depth = 1 }'), r"repa: .*a table with encoder"),
    (('positions = ["sincos+rope"]\n[[grid]]\nsizes = ["T"]\npatch_sizes = [4]',
      'repa = { encoder = "a.pth" }\n[[grid]]\nsizes = ["T"]\npatch_sizes = [2]\nrepa = { encoder = "b.pth" }'),
     r"entry DiT-T-2-repa is already in an earlier \[\[grid\]\] table, with other settings"),
])  # fmt: skip
def test_ablation_mistakes_are_one_line_errors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_spec(ablation_spec(tmp_path, edit=edit))


def test_compute_to_reach_interpolates_between_points():
    curve = [(10.0, 30.0), (20.0, 20.0), (40.0, 10.0)]
    assert compute_to_reach(curve, 25.0) == 15.0 and compute_to_reach(curve, 10.0) == 40.0
    assert compute_to_reach(curve, 40.0) == 10.0 and compute_to_reach(curve, 9.0) is None


def test_a_tiny_ablation_runs_guides_by_another_entry_and_reports_what_each_buys(tmp_path):
    keep = '[[grid]]\nsizes = ["T"]\npatch_sizes = [2]\nseeds = [0, 1]\n'
    path = ablation_spec(tmp_path)
    text = path.read_text()
    start, end = text.index("[[grid]]"), text.index("[eval]")
    path.write_text(text[:start] + keep + '[[grid]]\nsizes = ["T"]\npatch_sizes = [4]\n' + text[end:])
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=r"guide-DiT-T-4: entry DiT-T-4 has not finished: run it first"):
        run_study(path, out, only="DiT-T-2", device="cpu", progress=False)  # its guide is not trained yet
    # the run resumes where it stopped
    summaries = run_study(path, out, device="cpu", progress=False)
    assert [s["entry"] for s in summaries] == ["DiT-T-4", "DiT-T-2", "DiT-T-2-seed1"]  # the guide trains first
    study, rows = load_rows(out)
    t4 = json.loads((out / "DiT-T-4" / "entry.json").read_text())
    assert t4["eval_steps"] == list(load_spec(path).steps_of("DiT-T-4")) and t4["eval_steps"][-1] > 4
    guided = [r for r in rows if r.get("guide_entry") == "DiT-T-4"]
    assert len(guided) == 1 and guided[0]["entry"] == "DiT-T-2" and guided[0]["train_step"] == 4
    found = ablation_results(study, rows, "frechet_distance")
    base = [r for r in rows if r["entry"].startswith("DiT-T-2") and r["cfg_scale"] == 1.0 and r["steps"] == 3
            and r["train_step"] == 4]  # fmt: skip
    target = sum(r["metrics"]["frechet_distance"] for r in base) / 2
    assert found["entries"]["DiT-T-2"]["final"] == pytest.approx(target, rel=1e-12)
    assert found["noise"] == pytest.approx(abs(base[0]["metrics"]["frechet_distance"] -
                                               base[1]["metrics"]["frechet_distance"]), rel=1e-12)
    t4_curve = found["entries"]["DiT-T-4"]["curve"]
    assert [c for c, _ in t4_curve] == [r["training_compute_gflop"] for r in rows if r["entry"] == "DiT-T-4"
                                        and r["steps"] == 3 and r["seed"] == 0 and r["cfg_scale"] == 1.0]
    write_report(out)
    report = (out / "report.md").read_text()
    assert "| DiT-T-4 |" in report and "## Guidance on the last checkpoints" in report
    assert "guide: DiT-T-4" in report and (out / "ablation_compute.png").is_file()


@pytest.mark.parametrize("name", ["cpu-options", "imagenet-options"])
def test_the_shipped_options_specs_vary_every_idea_against_the_papers_dit(name, monkeypatch):
    monkeypatch.setenv("IMAGENET_LATENTS", "/data/imagenet-256-latents")
    monkeypatch.setenv("IMAGENET_REF", "/data/VIRTUAL_imagenet256_labeled.npz")
    study = load_spec(Path(__file__).parents[1] / "studies" / f"{name}.toml")
    names = set(study.entries)
    alone = {"+flow", "+flow+logit-normal", "+rmsnorm", "+qk-rmsnorm", "+swiglu", "+rope", "+repa",
             "+rmsnorm+qk-rmsnorm+swiglu+rope", "+flow+logit-normal+rmsnorm+qk-rmsnorm+swiglu+rope+repa"}
    assert {f"DiT-B-2{a}" for a in alone} | {"DiT-B-2", "DiT-B-2-seed1", "DiT-S-2"} <= names
    best = "DiT-B-2+flow+logit-normal+rmsnorm+qk-rmsnorm+swiglu+rope+repa"
    assert f"{best}-seed1" in names and study.final.entries == ("DiT-B-2", best)
    costs = study.ablation["train_gflops_per_image"]
    for n in names:  # every entry reaches the baseline's training compute at every point (to one step)
        assert abs(study.steps_of(n)[-1] * costs[n]["total"] - study.eval_steps[-1] * costs["DiT-B-2"]["total"]) \
            <= costs[n]["total"]

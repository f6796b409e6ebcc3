"""`ditlab.train(config, dataset=...)`: the example of docs/training.md, run as it is, and its guarantees."""

import re
from pathlib import Path

import pytest
import torch
from test_training import weights

import ditlab

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def doc_example() -> str:
    """The python block that follows the tested marker in docs/training.md."""
    text = DOC.read_text()
    found = re.search(r"<!-- tested: tests/test_training_custom_data.py -->\n```python\n(.*?)```", text, re.S)
    assert found, "the tested example of docs/training.md is gone"
    return found.group(1)


def test_the_docs_example_trains_resumes_and_refuses_other_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(doc_example(), str(DOC), "exec"), scope)
    assert capsys.readouterr().out.strip().endswith("20")
    straight = weights(tmp_path / "runs" / "squares")
    assert straight["step"] == 20 and straight["dataset_size"] == 512 and straight["vae"] == "pixel"
    assert straight["model_config"]["num_classes"] == 4 and straight["model_config"]["in_channels"] == 1
    config, squares = scope["config"], scope["Squares"]
    # The same dataset, stopped at step 10 and resumed: bit for bit the uninterrupted run.
    kw = {**config.to_dict(), "results": str(tmp_path / "resumed")}
    ditlab.train(ditlab.TrainConfig(**{**kw, "max_steps": 10}), dataset=squares(), device="cpu")
    ditlab.train(ditlab.TrainConfig(**kw), dataset=squares(), device="cpu")
    resumed = weights(tmp_path / "resumed")
    for part in ("model", "ema"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
    # Another dataset length in the same folder is refused, nothing written.
    with pytest.raises(ValueError, match="has 500 items, the run in .* was trained on 512"):
        ditlab.train(ditlab.TrainConfig(**{**kw, "max_steps": 30}), dataset=squares(500), device="cpu")
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").iterdir())] == [
        "step-0000010.pt", "step-0000020.pt"]


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(("items", "match"), [
    ([], "is empty"),
    ([(torch.zeros(1, 8, 4), 0)], r"item 0 is x of shape \(1, 8, 4\)"),
    ([(torch.zeros(1, 8, 8), 0)], "has no num_classes attribute"),
])  # fmt: skip
def test_unusable_datasets_are_one_line_errors(tmp_path, items, match):
    cfg = ditlab.TrainConfig(data="mine", results=str(tmp_path), max_steps=1, num_workers=0, progress=False)
    with pytest.raises(ValueError, match=match):
        ditlab.train(cfg, dataset=Pairs(items), device="cpu")
    assert not (tmp_path / "checkpoints").exists()

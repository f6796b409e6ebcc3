"""The package's layout, read from its source with `ast` (scripts/import_graph.py): no import cycle
among its modules, and none of the arrows the layout forbids (evaluation <-> sampling, the hub into
models / checkpoints / evaluation, anything but cli, demo and study into training)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import import_graph  # noqa: E402


def test_no_import_cycle_and_no_forbidden_arrow():
    assert import_graph.check(REPO / "src") == []


def test_the_graph_sees_cycles_and_forbidden_arrows(tmp_path):
    """The checker itself: a planted cycle (also through a function-level import) and a planted arrow
    from evaluation into sampling are found."""
    pkg = tmp_path / "ditlab"
    for sub in ("evaluation", "sampling", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluation" / "a.py").write_text("from ditlab.sampling import b\n")
    (pkg / "sampling" / "b.py").write_text("def f():\n    from ditlab.evaluation.a import x\n")
    (pkg / "training" / "c.py").write_text("import ditlab.training.d\n")
    (pkg / "training" / "d.py").write_text("from . import c\n")
    problems = import_graph.check(tmp_path)
    assert "import cycle: ditlab.evaluation.a <-> ditlab.sampling.b" in problems
    assert "import cycle: ditlab.training.c <-> ditlab.training.d" in problems
    assert "forbidden arrow: ditlab.evaluation.a -> ditlab.sampling.b" in problems
    assert "forbidden arrow: ditlab.sampling.b -> ditlab.evaluation.a" in problems
    assert len(problems) == 4

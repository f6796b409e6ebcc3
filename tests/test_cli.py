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

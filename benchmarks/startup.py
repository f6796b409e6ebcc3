"""Fixed start-up cost of the commands: seconds from a command's start to its first model step (the
first DiT forward of `train`, `sample`, `serve` and `demo`, the first Inception forward of `eval`),
for this checkout's code beside another checkout's (`--baseline-src`, e.g. the commit before a
change), side by side in the same run: at --precision auto natively, and at auto and fp32 under an
AVX2-only emulation of a CPU without bf16 instructions (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2: the ISAs of a Zen 3; /proc/cpuinfo still
shows this CPU's flags, the oneDNN cap is what tells ditlab there is no bf16).

Each command runs in a fresh Python (`python -c HOOK ARGV...`) whose HOOK wraps the model class's
forward as its module is imported: the first call records the time and the process's CPU time
(its own and its waited children's: the bf16 probe's) and ends the process. Inputs are tiny: a
digits checkpoint of one block (width 64), 3 images of 10 steps, an 8-image eval with random
Inception weights (the tests' stand-in). Wall seconds move with the machine's load (recorded before
and after); CPU seconds much less. Each case of ours runs first on an empty $DITLAB_HOME (a first
run: it may measure the bf16 probe there once), then again on the same one (every later run); the
baseline keeps nothing between runs and runs once.

    git archive BASE src | tar -x -C /tmp/base
    PYTHONPATH=src python benchmarks/startup.py --baseline-src /tmp/base/src --out benchmarks/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS_SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(OURS_SRC))
from ditlab.runtime.cpu_facts import cpu_model  # noqa: E402  (light: no torch)

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
COMMANDS = ("train", "sample", "serve", "eval", "demo")
# The precisions timed per command and ISA: the default (auto) everywhere, and fp32 beside it where the
# CPU has no bf16 (auto must cost no more than fp32 there). eval and demo have no --precision (the demo
# trains in fp32), so neither depends on the bf16 answer: timed natively only.
PRECISIONS = {("eval", "native"): ("n/a",), ("eval", "avx2"): (), ("demo", "native"): ("n/a",),
              ("demo", "avx2"): ()}  # fmt: skip
DEFAULT_PRECISIONS = {"native": ("auto",), "avx2": ("auto", "fp32")}
CHILD_TIMEOUT_S = 300.0

# Runs in the child before ditlab: wraps DiT.forward / InceptionV3.forward when their modules load.
HOOK = r"""
import importlib.abc, json, os, resource, sys, time
TARGETS = {"ditlab.models.dit": "DiT", "ditlab.evaluation.inception": "InceptionV3"}

def first_step():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.environ["STARTUP_MARK"], "w") as f:
        json.dump({"t": time.time(), "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
                   "modules": len(sys.modules)}, f)
    os._exit(0)

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            cls = getattr(module, TARGETS[name])
            forward = cls.forward
            def wrapped(*args, **kwargs):
                first_step()
                return forward(*args, **kwargs)
            cls.forward = wrapped
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
from ditlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_when_up(port: int, proc: subprocess.Popen) -> None:
    """Send one sample request as soon as the server accepts connections (the server ends at its
    first model step, so the request gets no answer)."""
    while proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CHILD_TIMEOUT_S)
            conn.connect()
        except OSError:
            time.sleep(0.01)
            continue
        body = json.dumps({"classes": [3], "per_class": 1, "steps": 10, "seed": 0})
        try:
            conn.request("POST", "/api/sample", body=body, headers={"Content-Type": "application/json"})
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass
        return


def argv_of(command: str, precision: str, fix: dict[str, str], out: Path) -> list[str]:
    prec = ["--precision", precision]
    if command == "train":
        return ["train", "--data", "digits", "--results", str(out / "run"), "--model", "DiT-S/2", "--depth", "1",
                "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "8", "--max-steps", "1",
                "--no-progress", *prec]  # fmt: skip
    if command == "sample":
        return ["sample", "--ckpt", fix["ckpt"], "--num-samples", "3", "--steps", "10", "--no-progress",
                "--out", str(out / "s.npz"), *prec]  # fmt: skip
    if command == "serve":
        return ["serve", "--ckpt", fix["ckpt"], "--port", fix["port"], *prec]
    if command == "demo":
        return ["demo", "--out", str(out / "demo"), "--no-progress"]
    return ["eval", fix["samples"], fix["ref"], "--inception", fix["inception"], "--batch-size", "8",
            "--device", "cpu", "--out", str(out / "m.json")]  # fmt: skip


def run_once(src: Path, argv: list[str], env: dict[str, str], work: Path) -> dict:
    mark, log = work / "mark.json", work / "stderr.txt"
    mark.unlink(missing_ok=True)
    env = {**env, "PYTHONPATH": str(src), "STARTUP_MARK": str(mark)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(log, "w") as err:  # a file, not a pipe: workers the command forked may outlive it
        proc = subprocess.Popen([sys.executable, "-c", HOOK, *argv], env=env, cwd=work, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)  # fmt: skip
        try:
            if argv[0] == "serve":
                request_when_up(int(argv[argv.index("--port") + 1]), proc)
            proc.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            try:  # the command's own children (data loader workers) go with it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not mark.exists():
        raise RuntimeError(f"{' '.join(argv)} ended ({proc.returncode}) before a model step:\n"
                           f"{log.read_text()[-2000:]}")
    got = json.loads(mark.read_text())
    return {"wall_s": round(got["t"] - start, 3), "cpu_s": round(got["cpu_s"], 3),
            "cpu_s_children": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
            "modules": got["modules"]}  # fmt: skip


def cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(command, isa, precision) of every case."""
    return [(command, isa, precision) for command in args.commands for isa in args.isa
            for precision in PRECISIONS.get((command, isa), DEFAULT_PRECISIONS[isa])]  # fmt: skip


def fixtures(work: Path, python_env: dict[str, str]) -> dict[str, str]:
    """A tiny digits checkpoint, an 8-image sample and reference batch, random Inception weights."""
    code = f"""
import numpy as np, torch, ditlab
from ditlab.evaluation.inception import WEIGHTS_FILENAME, random_state_dict
from ditlab.runtime.files import atomic_write
work = {str(work)!r}
torch.manual_seed(0)
model = ditlab.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1, num_heads=2, num_classes=10)
torch.save({{"model": model.state_dict(), "ema": model.state_dict(), "opt": {{}}, "step": 1,
            "config": {{"data": "digits"}}, "model_config": model.config}}, work + "/tiny.pt")
rng = np.random.default_rng(0)
for name in ("samples", "ref"):
    np.savez(f"{{work}}/{{name}}.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.arange(8))
torch.save(random_state_dict(0), f"{{work}}/{{WEIGHTS_FILENAME}}")
"""
    subprocess.run([sys.executable, "-c", code], env={**python_env, "PYTHONPATH": str(OURS_SRC)}, check=True)
    from_name = "weights-inception-2015-12-05-6726825d.pth"
    return {"ckpt": str(work / "tiny.pt"), "samples": str(work / "samples.npz"), "ref": str(work / "ref.npz"),
            "inception": str(work / from_name)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-src", required=True, help="the other checkout's src/ folder, timed beside ours")
    ap.add_argument("--baseline-name", default="baseline", help="what the baseline is, for the JSON")
    ap.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    ap.add_argument("--repeats", type=int, default=2, help="runs of ours per case: one first run, then later runs")
    ap.add_argument("--baseline-repeats", action="store_true", help="run the baseline as often (default: once)")
    ap.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=("native", "avx2"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = os.environ.copy()
    base.update(OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"), DITLAB_OFFLINE="1")
    base.pop("DITLAB_CPU_BF16_PROBE", None)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ditlab-startup-"))
    runs = []
    try:
        fix = fixtures(work, base)
        for command, isa, precision in cases(args):
            env = {**base, **(AVX2_ENV if isa == "avx2" else {})}
            for rep in range(args.repeats):  # run 0 on an empty $DITLAB_HOME, the later ones reuse it
                for name, src in (("baseline", Path(args.baseline_src)), ("ours", OURS_SRC)):
                    if rep and name == "baseline" and not args.baseline_repeats:
                        continue  # the baseline keeps nothing between runs: its later runs are its first
                    out, home = work / "out", work / f"home-{command}-{isa}-{precision}-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    fix["port"] = str(free_port())
                    got = run_once(src, argv_of(command, precision, fix, out), {**env, "DITLAB_HOME": str(home)}, out)
                    runs.append({"command": command, "isa": isa, "precision": precision, "code": name,
                                 "run": "first" if rep == 0 else "later", **got})  # fmt: skip
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for r in runs:
        key = f"{r['command']} {r['isa']} {r['precision']}"
        summary.setdefault(key, {}).setdefault(f"{r['code']} {r['run']}", []).append(r)
    table = {key: {case: {"wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 3),
                          "cpu_s_median": round(statistics.median(x["cpu_s"] for x in rs), 3), "runs": len(rs)}
                   for case, rs in cases.items()} for key, cases in summary.items()}  # fmt: skip
    import torch

    result = {"benchmark": "startup", "what": "seconds from the command's start to its first model step",
              "baseline": args.baseline_name, "torch": torch.__version__, "cpu": cpu_model(),
              "cores": os.cpu_count(), "threads": base["OMP_NUM_THREADS"], "avx2_emulation": AVX2_ENV,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "summary": table, "runs": runs}  # fmt: skip
    from dit_common import write_result  # torch is loaded by now (the result names its version)

    write_result(result, args.out)


if __name__ == "__main__":
    main()

"""gpu_check's machinery: child processes with time boxes under one budget, the log, the JSON
(rewritten after every step, so a run cut short still leaves what it found), and the MFU of
every benchmark row against the measured bf16 peak and the data sheet's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIN_STEP_S = 10.0  # a step is not started with less than this left of the budget


class StepFailed(RuntimeError):
    """A step ran and found something wrong (its message goes into the JSON)."""


@dataclass
class Check:
    """One gpu_check run: where it writes, its sizes, and the time it has left."""

    out: Path
    smoke: bool
    sizes: dict[str, Any]
    deadline: float  # time.monotonic() at which the whole run's budget ends
    step_deadline: float = 0.0
    step_name: str = ""
    peak: float | None = None  # measured dense bf16 TFLOP/s (the environment step)
    datasheet: float | None = None
    context: dict[str, Any] = field(default_factory=dict)  # what one step leaves for the next

    @property
    def work(self) -> Path:
        return self.out / "work"

    def env(self) -> dict[str, str]:
        src = str(REPO / "src")
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1",
                "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor-cache"),
                **({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""} if self.smoke else {})}  # fmt: skip

    def run(self, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run argv in its own process group until the step's deadline (then the group is killed and
        StepFailed raised); its output goes to the log and is returned."""
        timeout = max(1.0, self.step_deadline - time.monotonic())
        start = time.monotonic()
        with open(self.out / "gpu_check.log", "a") as log:
            log.write(f"\n=== [{self.step_name}] {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=cwd or REPO, env=self.env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                log.write(stdout + stderr + f"\n=== killed after {timeout:.0f} s (the step's time box)\n")
                raise StepFailed(f"time box: killed after {timeout:.0f} s: {' '.join(argv[1:3])}") from None
            log.write(stdout + stderr + f"\n=== exit {proc.returncode} after {time.monotonic() - start:.1f} s\n")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def bench(self, script: str, args: list[str]) -> dict[str, Any]:
        """Run benchmarks/<script> with --out into the work folder; its JSON, with the MFU added."""
        out = self.work / f"{self.step_name}.json"
        proc = self.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)])
        if proc.returncode != 0:
            raise StepFailed(f"{script} exited {proc.returncode}: {last_line(proc.stderr)}")
        result = json.loads(out.read_text())
        for row in result.get("runners", {}).values():
            row["mfu_of_measured_peak"] = row["tflops"] / self.peak if self.peak else None
            row["mfu_of_datasheet_peak"] = row["tflops"] / self.datasheet if self.datasheet else None
        return result


def last_line(text: str) -> str:
    """The last non-empty line of a child's stderr (the exception, usually)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-400:] if lines else "no output"


def run_steps(c: Check, steps: list[tuple[str, float, Callable[[Check], dict], bool]],
              header: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Run the steps in order, each within min(its box, what is left of the budget); write the JSON."""
    c.work.mkdir(parents=True, exist_ok=True)
    (c.out / "gpu_check.log").write_text(f"gpu_check {time.strftime('%Y-%m-%dT%H:%M:%S%z')} smoke={c.smoke}\n")
    start = time.monotonic()
    report: dict[str, Any] = {"benchmark": "gpu_check", "smoke": c.smoke, **header, "sizes": c.sizes,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {},
                              "json": str(c.out / "gpu_check.json")}  # fmt: skip
    for name, box, fn, in_smoke in steps:
        left = c.deadline - time.monotonic()
        if c.smoke and not in_smoke:
            record = {"status": "skipped", "reason": "not in the smoke run"}
        elif left < MIN_STEP_S:
            record = {"status": "skipped", "reason": f"budget spent ({left:.0f} s left)"}
        else:
            c.step_name, c.step_deadline = name, time.monotonic() + min(box, left)
            t0 = time.monotonic()
            try:
                record = {"status": "passed", "result": fn(c)}
            except StepFailed as e:
                record = {"status": "failed", "error": str(e)}
            except Exception as e:  # a bug in the check itself: recorded, and the next step still runs
                record = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            record["seconds"] = time.monotonic() - t0
            record["box_s"] = box
        report["steps"][name] = record
        print(f"gpu_check: {name}: {record['status']} {record.get('error', record.get('reason', ''))}",
              file=sys.stderr, flush=True)
        write_report(c, report, start)
    return report


def write_report(c: Check, report: dict[str, Any], start: float) -> None:
    """The summary fields, then the JSON (atomically: temp file, then rename)."""
    for status in ("passed", "failed", "skipped"):
        report[status] = [n for n, r in report["steps"].items() if r["status"] == status]
    report["seconds"] = time.monotonic() - start
    report["measured_bf16_tflops"], report["datasheet_bf16_tflops"] = c.peak, c.datasheet
    tmp = c.out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, c.out / "gpu_check.json")

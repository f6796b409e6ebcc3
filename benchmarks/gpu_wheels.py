"""Fetch the wheels gpu_check needs on a GPU machine that has torch but not diffusers or pytest.

The requirement closure of diffusers and pytest, at the versions installed here, evaluated for
the GPU machine's Python (3.12, Linux x86_64), less torch and its own requirements and the big
packages that machine already has; downloaded as binary wheels (`pip download --no-deps
--only-binary=:all:` for manylinux x86_64) into a folder (default .whl/, git-ignored), with a
requirements file naming the top-level pins. On the GPU machine:

    python -m pip install --no-index --find-links .whl -r .whl/requirements-gpu.txt

    python benchmarks/gpu_wheels.py [--dest .whl] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TOP_LEVEL = ("diffusers", "pytest")
# What the GPU machine has already (torch and its requirements are added from torch's metadata).
PRESENT = {"torch", "numpy", "scipy", "scikit-learn", "matplotlib", "triton"}
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TARGET_ENV = {"python_version": TARGET_PYTHON, "python_full_version": TARGET_PYTHON + ".0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip


def requirements_of(name: str) -> list[str]:
    """The names a distribution requires on the target (no extras), canonicalised."""
    out = []
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or Marker(str(req.marker)).evaluate(TARGET_ENV):
            out.append(canonicalize_name(req.name))
    return out


def closure(roots: tuple[str, ...], stop: set[str]) -> list[str]:
    """Every distribution reachable from roots through requirements, not entering `stop`."""
    seen: list[str] = []
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        seen.append(name)
        todo += requirements_of(name)
    return sorted(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=".whl", help="download folder (default .whl)")
    p.add_argument("--dry-run", action="store_true", help="print the pins, download nothing")
    args = p.parse_args()
    present = {canonicalize_name(n) for n in PRESENT}
    present |= set(closure(("torch",), set())) if _installed("torch") else set()
    pins = [f"{name}=={md.version(name)}" for name in closure(TOP_LEVEL, present)]
    print("\n".join(pins))
    if args.dry_run:
        return
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           TARGET_PYTHON, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)
    top = [pin for pin in pins if pin.split("==")[0] in TOP_LEVEL]
    (dest / "requirements-gpu.txt").write_text("\n".join(top) + "\n")
    print(f"{len(pins)} wheels in {dest}; install with: python -m pip install --no-index --find-links {dest} "
          f"-r {dest}/requirements-gpu.txt")


def _installed(name: str) -> bool:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()

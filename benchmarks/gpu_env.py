"""The machine's ceilings, measured: a dense bf16 matmul (the MFU denominator gpu_check uses beside
the data sheet's figure) and the device's copy bandwidth, with the device name and versions. JSON out.

    PYTHONPATH=src python benchmarks/gpu_env.py [--size 8192] [--device cuda] [--out env.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from dit_common import conditions, peak_tflops, sync, time_steps, write_result  # noqa: E402

GB = 1e9


def matmul_tflops(n: int, device: torch.device, reps: int) -> dict[str, float]:
    """Best and median TFLOP/s of an (n, n) @ (n, n) bf16 matmul (2 n^3 FLOPs), after a warm-up."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = sorted(time_steps(lambda: a @ b, device, reps))
    flops = 2 * n**3
    return {"best_tflops": flops / times[0] / 1e12, "median_tflops": flops / times[len(times) // 2] / 1e12}


def copy_bandwidth_gbs(nbytes: int, device: torch.device, reps: int) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of an nbytes buffer, best of reps."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = time_steps(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / min(times) / GB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="side of the square bf16 matmul (default 8192)")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer of the copy-bandwidth test (default 1024 MiB)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    result = {"benchmark": "gpu_env", "conditions": conditions(device, None),
              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
              "datasheet_bf16_tflops": peak_tflops(device)}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count,
                      capability=f"{props.major}.{props.minor}", driver=torch.cuda.driver_version()
                      if hasattr(torch.cuda, "driver_version") else None)  # fmt: skip
    result["matmul_bf16"] = {"size": args.size, **matmul_tflops(args.size, device, args.reps)}
    result["copy_gbs"] = copy_bandwidth_gbs(args.copy_mib * 2**20, device, args.reps)
    sync(device)
    result["seconds"] = time.perf_counter() - start
    write_result(result, args.out)


if __name__ == "__main__":
    main()

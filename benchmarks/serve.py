"""`ditlab serve` under load: requests/s and latency for 1, 4 and 16 concurrent clients, with
shared model batches against serving the requests one by one, and whether every image equals the
one its request gets alone.

The server (uvicorn on 127.0.0.1, in this process) holds the demo's model shape (4 adaLN-Zero
blocks, width 128, patch 2, 8x8 grayscale pixels; random weights: speed does not depend on them).
Each client sends its requests one after another (1 image, a class of its own, its own seed, the
same sampler, steps and guidance); "one by one" is the same server with batches of one request.
JSON to stdout and --out. On a loaded machine compare `batched_speedup_cpu` (requests per CPU
second of this process, which holds the server and the clients) rather than the wall-clock one.

    PYTHONPATH=src python benchmarks/serve.py --out benchmarks/results/serve_cpu.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=src \
        python benchmarks/serve.py --threads 1 --out benchmarks/results/serve_cpu_avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")  # as the tests: MKL's fixed code path, read once
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dit_common import write_result  # noqa: E402
from serve_helpers import LiveServer, save_digits_checkpoint  # noqa: E402

import ditlab  # noqa: E402
from ditlab.runtime.cpu_facts import cpu_model  # noqa: E402
from ditlab.serve.app import create_app  # noqa: E402
from ditlab.serve.engine import Engine  # noqa: E402
from ditlab.serve.requests import Defaults, Limits  # noqa: E402

ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OMP_NUM_THREADS")


def decode(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def run_clients(server: LiveServer, clients: int, per_client: int, body: dict, batches: list | None = None) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; figures and the PNGs by seed.
    CPU seconds are this process's (server, batcher and clients), less sensitive to other load than
    wall seconds; `batches` (the batcher's record) gives the mean images per model batch."""
    latencies, pngs, errors = [], {}, []
    seen = len(batches) if batches is not None else 0

    def client(k: int) -> None:
        for j in range(per_client):
            seed = k * per_client + j
            t0 = time.perf_counter()
            status, _, png = server.sample(**body, classes=[seed % 10], seed=seed)
            latencies.append(time.perf_counter() - t0)
            (pngs.__setitem__(seed, png) if status == 200 else errors.append(status))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start, cpu_start = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    n = clients * per_client
    ran = [images for _, images in (batches or [])[seen:]]
    return {"clients": clients, "requests": n, "errors": len(errors), "seconds": round(wall, 3),
            "requests_per_s": round(n / wall, 3), "cpu_s": round(cpu, 3), "requests_per_cpu_s": round(n / cpu, 3),
            "mean_batch_images": round(statistics.mean(ran), 2) if ran else None,
            "latency_mean_s": round(statistics.mean(latencies), 4),
            "latency_p50_s": round(statistics.median(latencies), 4),
            "latency_max_s": round(max(latencies), 4), "pngs": pngs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement, split over the clients")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--window-ms", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = ditlab.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                       num_classes=10).eval()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ditlab-serve-bench-{os.getpid()}.pt"
    ckpt = save_digits_checkpoint(tmp, model)
    body = {"per_class": 1, "steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale}
    engine = Engine(ckpt, device="cpu", precision=args.precision)
    served = create_app(engine, Limits(max_steps=args.steps, max_queue=256),
                        Defaults(steps=args.steps), window_s=args.window_ms / 1000)
    server = LiveServer(served.app)
    rows, alone = [], None
    try:
        run_clients(server, 1, 2, body)  # warm-up
        for mode in ("one_by_one", "batched"):
            served.batcher.max_batch_images = 1 if mode == "one_by_one" else Limits().max_images
            for c in args.clients:
                r = run_clients(server, c, max(1, args.requests // c), body, served.batcher.batches)
                pngs = r.pop("pngs")
                if mode == "one_by_one" and c == 1:
                    alone = pngs
                r["identical_to_alone"] = sum(pngs[s] == alone[s] for s in pngs)
                r["max_pixel_diff_to_alone"] = max(int(np.abs(decode(pngs[s]) - decode(alone[s])).max()) for s in pngs)
                rows.append({"mode": mode, **r})
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        server.close()
        tmp.unlink(missing_ok=True)
    speedup = {c: round(next(r["requests_per_s"] for r in rows if r["mode"] == "batched" and r["clients"] == c)
                        / next(r["requests_per_s"] for r in rows if r["mode"] == "one_by_one" and r["clients"] == c),
                        2) for c in args.clients}
    speedup_cpu = {c: round(next(r["requests_per_cpu_s"] for r in rows if r["mode"] == "batched" and r["clients"] == c)
                            / next(r["requests_per_cpu_s"] for r in rows if r["mode"] == "one_by_one"
                                   and r["clients"] == c), 2) for c in args.clients}  # fmt: skip
    result = {"benchmark": "serve", "model": "DiT depth 4, width 128, patch 2, 8x8x1 pixels (the demo's shape)",
              "request": body, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg()[0], "precision": args.precision,
              "autocast": engine.meta["autocast"], "isa_caps": {k: os.environ[k] for k in ISA_VARS if k in os.environ},
              "rows": rows, "batched_speedup": speedup, "batched_speedup_cpu": speedup_cpu,
              "note": "identical_to_alone: responses byte-equal to the same request in the 1-client one-by-one run"}
    write_result(result, args.out)


if __name__ == "__main__":
    main()

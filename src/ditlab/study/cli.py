"""The flags of `ditlab study run` and `ditlab study report` (registered by ditlab.cli)."""

from __future__ import annotations

import argparse


def add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="the paper's experiments from a spec file: run, then report",
                       description="Run a study (a TOML spec of runs: model configs, block designs, seeds, "
                       "evaluation points, samplers, metric) and report it as results.json, the paper's figures "
                       "and report.md. Re-running resumes and recomputes nothing.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="train, sample and evaluate every entry (run again to resume)",
                             description="Train (one `ditlab train` results folder per entry), sample at every "
                             "evaluation point with per-image seeds, evaluate. Under torchrun every rank trains "
                             "and samples: `torchrun --nproc_per_node=8 -m ditlab study run SPEC --out DIR "
                             "--only NAME` runs one entry, e.g. one per job of a SLURM array.")
    run.add_argument("spec", metavar="SPEC", help="study spec (.toml), e.g. studies/cpu-mini.toml")
    run.add_argument("--out", required=True, help="study folder (created; an interrupted study resumes into it)")
    run.add_argument("--only", metavar="NAME", default=None, help="run this entry only (see `ditlab study list`)")
    run.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.set_defaults(func=_run)
    listing = actions.add_parser("list", help="the entries of a spec, one a line (for --only and job arrays)")
    listing.add_argument("spec", metavar="SPEC", help="study spec (.toml)")
    listing.set_defaults(func=_list)
    report = actions.add_parser("report", help="results.json, the figures and report.md of a study folder",
                                description="Works on a partly finished study: reports what is done so far.")
    report.add_argument("out", metavar="DIR", help="the --out folder of `ditlab study run`")
    report.set_defaults(func=_report)


def _run(args: argparse.Namespace) -> int:
    from ditlab.study.runner import run_study

    run_study(args.spec, args.out, only=args.only, device=args.device, progress=args.progress)
    return 0


def _list(args: argparse.Namespace) -> int:
    from ditlab.study.spec import load_spec

    print("\n".join(load_spec(args.spec).entries))
    return 0


def _report(args: argparse.Namespace) -> int:
    from ditlab.study.report import write_report

    s = write_report(args.out)
    if s["written"]:
        print(f"{s['out']}: results.json ({s['rows']} rows), report.md, {', '.join(s['figures']) or 'no figures yet'}")
    else:
        print(f"{s['out']}: up to date ({s['rows']} rows), nothing rewritten")
    return 0

"""The paper's experiments (Peebles & Xie, 2023, figures 5, 6, 8, 9, 10) as one spec file:
`ditlab study run SPEC --out DIR` trains, samples and judges every entry; `ditlab study report DIR`
writes results.json, the figures and report.md. Modules: spec (the TOML format), runner, results,
findings, figures, report, cli."""

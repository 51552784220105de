"""Entry points (`segx-train`, `segx-evaluate`, `segx-predict`, `segx-export`): the only modules besides
`segx.report.cli` and `segx.bench.cli` that read the command line."""

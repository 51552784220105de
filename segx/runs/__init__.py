"""The run layer, on `segx.core` only: `status` (how a run ended), `record` (metrics.json), `discovery` (finding
and reading run directories), `overrides` (parsing `key=value`), `job` (a job's lifecycle) and `summary` (the
Hydra end-of-sweep callback)."""

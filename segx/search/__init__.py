"""Search with early stopping: a sweep's overrides as a search space, run as one Ray Tune experiment."""

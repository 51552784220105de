"""`hydra/sweeper=tune`: a sweep run as one Ray Tune experiment (segx.search)."""

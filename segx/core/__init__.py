"""The bottom layer: user-facing errors, atomic file writes, the config tree printout, process ranks."""

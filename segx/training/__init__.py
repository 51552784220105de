"""Training: the LightningModule, losses, optimizers and schedules, the runtime (precision, devices, DDP), the
`train` function and its callbacks."""

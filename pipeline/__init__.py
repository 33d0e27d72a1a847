"""Training driver: torchrun/Slurm entry point, data loading, checkpoints, metrics."""

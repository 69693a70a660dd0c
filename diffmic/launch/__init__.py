"""Launching on clusters: Slurm jobs through submitit (`diffmic train --slurm`, `diffmic eval --slurm`)."""

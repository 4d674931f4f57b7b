"""Sandboxes as Slurm jobs: submission, placement, liveness and the sbatch/squeue front."""

"""diffmic: DiffMIC (dual-guidance diffusion for medical image classification), trained at scale."""

__version__ = "0.1.0"

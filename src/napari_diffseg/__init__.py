"""Brain-tumour segmentation with conditional diffusion ensembles (Wolleb et al. 2021)."""

__version__ = "0.1.0"

MODALITIES = ("t1", "t1ce", "t2", "flair")

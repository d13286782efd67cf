"""TaI-DPT (Guo et al., CVPR 2023)."""

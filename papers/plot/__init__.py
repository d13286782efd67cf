"""PLOT: Prompt Learning with Optimal Transport for Vision-Language Models (Chen et al., ICLR 2023)."""

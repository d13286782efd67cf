"""WiSE-FT: Robust fine-tuning of zero-shot models (Wortsman et al., CVPR 2022)."""

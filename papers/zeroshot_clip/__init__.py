"""Zero-shot CLIP baseline (Radford et al., 2021) with the dataset's CoOp template or the 80-template ensemble."""

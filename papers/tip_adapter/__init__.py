"""Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification (Zhang et al., ECCV 2022)."""

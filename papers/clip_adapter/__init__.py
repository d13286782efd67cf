"""CLIP-Adapter: Better Vision-Language Models with Feature Adapters (Gao et al., IJCV 2023)."""

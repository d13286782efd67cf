"""SVL-Adapter: Self-Supervised Adapter for Vision-Language Pretrained Models (Pantazis et al., BMVC 2022)."""

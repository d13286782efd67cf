"""TaskRes: Task Residual for Tuning Vision-Language Models (Yu et al., CVPR 2023)."""

"""UPL: Unsupervised Prompt Learning for Vision-Language Models (Huang, Chu, Wei, arXiv 2204.03649, 2022)."""

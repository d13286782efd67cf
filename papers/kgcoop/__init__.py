"""KgCoOp: Visual-Language Prompt Tuning with Knowledge-guided Context Optimization (Yao et al., CVPR 2023)."""

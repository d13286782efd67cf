"""CuPL: What does a platypus look like? Generating customized prompts for zero-shot image classification (Pratt et al., ICCV 2023)."""

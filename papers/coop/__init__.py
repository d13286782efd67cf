"""CoOp: Learning to Prompt for Vision-Language Models (Zhou et al., IJCV 2022)."""

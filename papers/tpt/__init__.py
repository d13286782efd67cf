"""TPT: Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models (Shu et al., NeurIPS 2022)."""

"""SubPT: Understanding and Mitigating Overfitting in Prompt Tuning for Vision-Language Models (Ma et al., TCSVT 2023)."""

"""DPT with Class-Aware Visual Prompt Tuning (Xing et al., IEEE TMM 2023; arXiv 2208.08340)."""

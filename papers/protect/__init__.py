"""ProTeCt: Prompt Tuning for Taxonomic Open Set Classification (Wu, Ho, Vasconcelos, CVPR 2024)."""

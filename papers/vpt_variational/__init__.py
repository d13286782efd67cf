"""VPT: Variational prompt tuning / Bayesian Prompt Learning (Derakhshani et al., ICCV 2023)."""

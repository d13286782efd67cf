"""Linear-probe CLIP baseline: logistic regression on frozen image features, C searched on val."""

"""DualCoOp (Sun et al., NeurIPS 2022)."""

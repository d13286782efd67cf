"""MaskCLIP: annotation-free segmentation from CLIP's last-layer value path (Zhou, Loy, Dai, ECCV 2022)."""

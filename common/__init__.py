"""Shared library of vlm-transfer: CLIP loading, data, engine, metrics and reports."""

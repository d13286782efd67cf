"""LASP: Text-to-Text Optimization for Language-Aware Soft Prompting of Vision & Language Models (Bulat & Tzimiropoulos, CVPR 2023)."""

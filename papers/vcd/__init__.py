"""Visual Classification via Description from Large Language Models (Menon & Vondrick, ICLR 2023)."""

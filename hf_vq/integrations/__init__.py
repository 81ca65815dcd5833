"""Thin integrations with transformers, timm and the Hub. Algorithms and modules live elsewhere."""

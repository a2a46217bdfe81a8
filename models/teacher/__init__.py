"""Pseudo-labeling teachers."""

"""Metrics, the promotion gate and the figures logged with each round."""

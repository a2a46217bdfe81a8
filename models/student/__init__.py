"""Small, fast segmentation students (what the line runs)."""

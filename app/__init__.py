"""Entry points: the `loom` command, the demo, and running flows in this process (the top layer)."""

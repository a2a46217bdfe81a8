"""The services Loom talks to and runs: Label Studio, MLflow, DVC + git, the local stack, the ML backend."""

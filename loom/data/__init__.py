"""Data and I/O: images and masks, ingest, the manifest, the quarantine, people's labels, predictions."""

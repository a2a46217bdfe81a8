"""Datasets in the Loom dataset folder layout.

```
DATASET/images/<stem>.png      images
DATASET/masks/<stem>.png       optional single-channel class-index mask (0 = background, k = classes[k-1])
DATASET/captions/<stem>.txt    optional free-text caption
DATASET/classes.json           JSON list of class names
DATASET/manifest.parquet       loom.data.manifest columns; ``path`` relative to DATASET; ``split`` set
```
``loom.datasets.fabric`` renders the embedded synthetic fabric set; ``loom.datasets.importers`` converts
public layouts (MVTec AD, plain image folders); ``loom.data.ingest.ingest_folder`` brings any of them into a
workspace.
"""

"""The data platform: source adapters, per-face ingestion, WebDataset shards + manifests, the training reader."""

"""Data: raw readers (readers) and record schemas (schemas), preprocessing into shards (preprocess, packing,
shards), the batch schema (batch) and the Grain pipeline that feeds training (pipeline). No JAX, no model."""

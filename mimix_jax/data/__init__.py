"""Data: raw readers and schemas, the shard format, packing, and the Grain pipeline.

`from mimix_jax.data import make_iterator, read_manifest` works; Grain is imported only when the pipeline is
used, so preprocessing workers stay light.
"""


def __getattr__(name):
  if name == "make_iterator":
    from mimix_jax.data.pipeline import make_iterator

    return make_iterator
  if name == "read_manifest":
    from mimix_jax.data.shards import read_manifest

    return read_manifest
  raise AttributeError(f"module 'mimix_jax.data' has no attribute {name!r}")

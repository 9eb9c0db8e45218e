"""Webdataset shards of pre-encoded clips: schema, writer, reader with packing, synthetic data."""

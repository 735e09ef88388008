"""The stored library: Zarr arrays of full-resolution output embeddings and a Parquet manifest."""

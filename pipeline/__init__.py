"""The offline precompute pipeline: corpus -> chunks -> embedder -> storage (Ray Data jobs)."""

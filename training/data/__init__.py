"""From shards to batches: the index of shards, the per-rank sample stream, views decoded
into buckets, task layouts built by sample kind, skips counted, seeds per (rank, batch)."""

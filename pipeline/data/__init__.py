"""Per-rank readers of the tokenized shards with a deterministic global order and exact resume."""

"""What preprocessing and training share: the data contract (``contract.py``: token ids, shard
formats, the typed manifest) and storage on local disk or S3 (``storage.py``).

Kept free of torch and megatron so CPU-only Ray workers import it cheaply.
"""

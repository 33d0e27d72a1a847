"""The bottom layer: what preprocessing and training share, defined once.

- ``contract.py``: token ids, shard formats and names, the Arrow schema, the typed manifest;
- ``samples.py``: a stored sample and its WebDataset members (writer, fixtures and reader);
- ``encoders.py``: each vision encoder's pixel mean/std, pad colour, class token, grid rule;
- ``storage.py``: local disk or S3.

Nothing here imports torch, megatron or the packages above it (``megatron_vwlmm``,
``pipeline``, ``preprocessing``; ``tests/vwlmm_data/test_bottom_layer.py`` checks), so CPU-only
Ray workers import it cheaply and nothing below can reach up.
"""

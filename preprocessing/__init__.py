"""Ray jobs that turn raw image-text data into tokenized WebDataset / Arrow shards."""

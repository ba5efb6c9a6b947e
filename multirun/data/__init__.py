"""Training data: tokenizers, text to MDS shards, the demo corpus and the Streaming loader."""

"""Data: recipes and detokenizers, tokenizers, token shards (build and read), the sampler."""

"""Data: corpus, tokenizer, token store and the batch pipeline."""

"""Prompts -> features: the embedder interface (`base`), its kinds (`text`, `tfidf`, `combined`),
the registry (`registry`), the on-disk cache (`cache`), ragged token storage (`tokens`) and the one
feature stage every caller uses (`stage`)."""

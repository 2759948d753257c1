"""Thin Ray shells over the pure `catimage` core: the build job (Ray Data) and the training job (Ray Train)."""

"""Artifact curation (paper §3.2): frozen ViT-S features, a 5-fold linear classifier, fold-averaged predictions."""

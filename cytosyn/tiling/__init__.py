"""Candidate grids, per-slide sampling, lossless tile extraction and QC thumbnails."""

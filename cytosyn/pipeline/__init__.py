"""`cytosyn data build`: the stages of the data pipeline composed over a dataset root."""

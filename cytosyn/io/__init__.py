"""Dataset root layout, data contracts, atomic writes and stable hashing."""

"""Command-line interface (`cytosyn …`). Imports the library; the library never imports it."""

"""The `dipstream` command line."""

"""The `torpor` command line."""

"""Bridged networking: addresses from a per-data-root pool, and the host side (the
bridge, a persistent TAP per instance). Knows nothing of instances: callers name the
owner of an address and the TAP."""

"""The upstream relay: one pooled HTTP client and the mapping of its answers."""

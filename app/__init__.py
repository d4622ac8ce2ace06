"""replicate-gateway: a Replicate-compatible gateway with its own tokens and ledger."""

__version__ = "0.1.0"

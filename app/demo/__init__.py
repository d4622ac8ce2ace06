"""A built-in simulated relay, so the gateway can be tried with no relay account."""

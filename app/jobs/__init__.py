"""Background jobs run in the gateway process."""

"""Predictions: create, read, list and cancel, recorded in the ledger."""

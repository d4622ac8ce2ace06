"""Prices and usage reports."""

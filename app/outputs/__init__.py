"""Durable outputs: copies of output files served at stable gateway URLs."""

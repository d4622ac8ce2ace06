"""Webhooks: signed, durable deliveries to clients, and verified hints from the upstream."""

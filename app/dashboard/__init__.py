"""The web dashboard: usage, tokens and predictions, served as HTML at /dashboard."""

"""The admin API, enabled by GATEWAY_ADMIN_TOKEN."""

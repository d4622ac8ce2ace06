"""Every route the gateway serves, and what authorizes a call to it."""

from __future__ import annotations

from enum import StrEnum

API_PREFIXES = ("/replicate/v1", "/v1")


class Access(StrEnum):
    """What a request must carry to be answered."""

    PUBLIC = "public"                # nothing
    AUTHENTICATED = "authenticated"  # a live gateway token in `Authorization: Bearer` (or `Token`)
    ADMIN = "admin"                  # GATEWAY_ADMIN_TOKEN in `Authorization: Bearer`
    CAPABILITY = "capability"        # a signed capability in the URL the gateway handed out
    SESSION = "session"              # a dashboard session cookie, the admin's or a team token's
    ADMIN_SESSION = "admin session"  # the admin's dashboard session cookie


# Served under each of API_PREFIXES.
API_ROUTES: dict[tuple[str, str], Access] = {
    ("POST", "/predictions"): Access.AUTHENTICATED,
    ("GET", "/predictions"): Access.AUTHENTICATED,
    ("GET", "/predictions/{prediction_id}"): Access.AUTHENTICATED,
    ("POST", "/predictions/{prediction_id}/cancel"): Access.AUTHENTICATED,
    ("POST", "/models/{owner}/{name}/predictions"): Access.AUTHENTICATED,
    ("POST", "/deployments/{owner}/{name}/predictions"): Access.AUTHENTICATED,
    ("GET", "/models/{owner}/{name}"): Access.AUTHENTICATED,
    ("GET", "/models/{owner}/{name}/versions"): Access.AUTHENTICATED,
    ("GET", "/models/{owner}/{name}/versions/{version_id}"): Access.AUTHENTICATED,
    ("GET", "/account"): Access.AUTHENTICATED,
    ("GET", "/webhooks/default/secret"): Access.AUTHENTICATED,
    ("POST", "/files"): Access.AUTHENTICATED,
    ("GET", "/files"): Access.AUTHENTICATED,
    ("GET", "/files/{file_id}"): Access.AUTHENTICATED,
    ("DELETE", "/files/{file_id}"): Access.AUTHENTICATED,
    # Clients fetch these without a token (the npm client sends none); the URL is the credential.
    ("GET", "/streams/{ref}"): Access.CAPABILITY,
    ("GET", "/outputs/{ref}/{name}"): Access.CAPABILITY,
    ("GET", "/files/{file_id}/download"): Access.CAPABILITY,
    ("HEAD", "/files/{file_id}/download"): Access.CAPABILITY,
    # The upstream calls it with no gateway token; a webhook signature is checked on top when
    # GATEWAY_UPSTREAM_WEBHOOK_SECRET is set.
    ("POST", "/webhooks/inbound/{ref}"): Access.CAPABILITY,
}

OTHER_ROUTES: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access.PUBLIC,
    ("GET", "/readyz"): Access.PUBLIC,
    # Unauthenticated like the health checks; deployments keep it on an internal network.
    ("GET", "/metrics"): Access.PUBLIC,
    ("GET", "/openapi.json"): Access.PUBLIC,
    ("HEAD", "/openapi.json"): Access.PUBLIC,
    ("GET", "/admin/v1/tokens"): Access.ADMIN,
    ("POST", "/admin/v1/tokens"): Access.ADMIN,
    ("GET", "/admin/v1/tokens/{name_or_id}"): Access.ADMIN,
    ("PATCH", "/admin/v1/tokens/{name_or_id}"): Access.ADMIN,
    ("DELETE", "/admin/v1/tokens/{name_or_id}"): Access.ADMIN,
    ("POST", "/admin/v1/tokens/{name_or_id}/revoke"): Access.ADMIN,
    ("GET", "/admin/v1/groups"): Access.ADMIN,
    ("POST", "/admin/v1/groups"): Access.ADMIN,
    ("GET", "/admin/v1/groups/{name_or_id}"): Access.ADMIN,
    ("PATCH", "/admin/v1/groups/{name_or_id}"): Access.ADMIN,
    ("DELETE", "/admin/v1/groups/{name_or_id}"): Access.ADMIN,
    ("GET", "/admin/v1/usage"): Access.ADMIN,
    ("GET", "/admin/v1/predictions"): Access.ADMIN,
    ("GET", "/admin/v1/webhooks/deliveries"): Access.ADMIN,
    ("GET", "/admin/v1/upstreams"): Access.ADMIN,
    ("GET", "/dashboard/login"): Access.PUBLIC,
    ("POST", "/dashboard/login"): Access.PUBLIC,
    ("GET", "/dashboard/"): Access.PUBLIC,  # a redirect to /dashboard
    ("GET", "/dashboard/static/dashboard.css"): Access.PUBLIC,
    ("GET", "/p/{prediction_id}"): Access.PUBLIC,  # a redirect to the prediction's page
    ("GET", "/replicate/p/{prediction_id}"): Access.PUBLIC,
    ("POST", "/dashboard/logout"): Access.SESSION,
    ("GET", "/dashboard"): Access.SESSION,
    ("GET", "/dashboard/usage"): Access.SESSION,
    ("GET", "/dashboard/usage.csv"): Access.SESSION,
    ("GET", "/dashboard/tokens"): Access.SESSION,
    ("GET", "/dashboard/tokens/{token_id}"): Access.SESSION,
    ("GET", "/dashboard/predictions"): Access.SESSION,
    ("GET", "/dashboard/predictions/{prediction_id}"): Access.SESSION,
    ("POST", "/dashboard/tokens"): Access.ADMIN_SESSION,
    ("POST", "/dashboard/tokens/{token_id}"): Access.ADMIN_SESSION,
    ("POST", "/dashboard/tokens/{token_id}/revoke"): Access.ADMIN_SESSION,
}


def inventory() -> dict[tuple[str, str], Access]:
    """Every (method, path template) the gateway serves, with what it asks of a request."""
    served = {(method, prefix + path): access
              for prefix in API_PREFIXES for (method, path), access in API_ROUTES.items()}
    return {**served, **OTHER_ROUTES}

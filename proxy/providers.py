"""The provider presets, as data.

A preset only fills in defaults; every value can be overridden in ``[auth]``, ``[upstream]`` and
``[inject]``. The quirks of a vendor are fields here (``auth_string``, ``token_path``), read by
``config.py`` and ``idp.py``, never a branch on the provider's name elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    # Defaults for [auth]; absent keys keep the generic defaults of config.py.
    auth: dict[str, Any] = field(default_factory=dict)
    upstream_url: str = ""
    inject_header: str = "Authorization"
    inject_value: str = "Bearer {token}"
    # When no token_url is given: the token endpoint is this path on upstream.url (WebCommander).
    token_path: str = ""
    # Send `auth_string` = base64("username:password") instead of username/password (WebCommander).
    auth_string: bool = False
    # The provider speaks Keycloak: logout/revoke endpoints sit beside the token endpoint, and an
    # `issuer` can be given instead of a token_url.
    keycloak: bool = False
    # Keys the user must give for this preset, with a hint shown when one is missing.
    required: dict[str, str] = field(default_factory=dict)


WE360_TOKEN_URL = "https://auth.in.we360.ai/realms/ind-prod/protocol/openid-connect/token"
OLI_TOKEN_URL = "https://auth.olisystems.com/auth/realms/api/protocol/openid-connect/token"

PRESETS: dict[str, Preset] = {
    "we360": Preset(
        name="we360",
        summary="we360.ai: Keycloak realm ind-prod, password grant, client_id = Customer ID",
        auth={"token_url": WE360_TOKEN_URL, "grant_type": "password", "body": "form"},
        upstream_url="https://api.in.we360.ai",
        keycloak=True,
        required={
            "client_id": "your we360 Customer ID (profile icon, top right of the we360.ai portal)",
            "username": "the email address of your we360.ai account",
        },
    ),
    "keycloak": Preset(
        name="keycloak",
        summary="any Keycloak realm: token_url, or issuer = https://host/realms/NAME (discovery)",
        auth={"body": "form"},
        keycloak=True,
    ),
    "oli": Preset(
        name="oli",
        summary="OLI Systems: Keycloak realm api, client_id apiclient, password grant",
        auth={"token_url": OLI_TOKEN_URL, "grant_type": "password", "body": "form", "client_id": "apiclient"},
        keycloak=True,
        required={"username": "the user name OLI issued you"},
    ),
    "webcommander": Preset(
        name="webcommander",
        summary="WebCommander: POST {store}/api/v4/oauth2/token, JSON, auth_string, access_token header",
        auth={"grant_type": "client_credentials", "body": "json"},
        token_path="/api/v4/oauth2/token",
        inject_header="access_token",
        inject_value="{token}",
        auth_string=True,
        required={
            "client_id": "the client ID of your WebCommander application",
            "client_secret": "the client secret of your WebCommander application",
            "username": "your WebCommander user name (sent inside auth_string)",
            "password": "your WebCommander password (sent inside auth_string)",
            "redirect_uri": "the redirect URI given when the application was set up (the token request sends it)",
        },
    ),
    "oauth2": Preset(
        name="oauth2",
        summary="a generic RFC 6749 provider: any grant, form or JSON body, body or Basic client auth",
        auth={},
    ),
}

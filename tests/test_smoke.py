"""End-to-end smoke: login, forward, inject."""

from tests.fakes.servers import keycloak_config, start_api, start_idp, start_proxy


async def test_forwards_with_injected_token(aiohttp_server, aiohttp_client):
    """A plain request comes back with the upstream's answer, authenticated as the configured user."""
    idp = await start_idp(aiohttp_server)
    _api, api_url = await start_api(aiohttp_server, idp)
    client = await start_proxy(aiohttp_client, keycloak_config(idp, api_url))
    resp = await client.get("/v1/hello")
    assert resp.status == 200
    assert (await resp.json())["subject"] == "demo"
    assert idp.token_requests == 1

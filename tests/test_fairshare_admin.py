"""Fair sharing's admin side: a tenant's `share` and a key's traffic class, through the admin API
and the CLI, and how the authenticated principal carries the class."""

from __future__ import annotations

import json
import uuid

from test_admin_api import Api, api, error_of  # noqa: F401
from test_admin_cli import cli, server  # noqa: F401

from agencyllm.quotas import store


async def test_share_round_trips_and_bad_shares_are_refused(api: Api):  # noqa: F811
    name = await api.tenant()
    assert (await api.call("GET", f"/tenants/{name}/quota")).json()["share"] is None
    put = await api.call("PUT", f"/tenants/{name}/quota", json={"tokens_per_day": 10_000, "share": 3})
    assert put.status_code == 200 and put.json()["share"] == 3
    assert (await api.call("GET", f"/tenants/{name}/quota")).json()["share"] == 3
    assert (await store.tenant_shares(await api.db.pool()))[name] == 3.0

    for bad in ({"share": 0}, {"share": -1}, {"share": "big"}, {"share": 1001}, {"share": True}):
        response = await api.call("PUT", f"/tenants/{name}/quota", json=bad)
        assert response.status_code == 400, (bad, response.text)
        assert error_of(response)["param"] == "share"
    user = await api.call("PUT", f"/tenants/{name}/users/sub-1/quota", json={"share": 2})
    assert user.status_code == 400 and error_of(user)["param"] == "share"
    assert (await api.call("GET", f"/tenants/{name}/quota")).json()["share"] == 3


async def test_a_batch_key_authenticates_as_batch(api: Api):  # noqa: F811
    name = await api.tenant()
    created = await api.service_key(name, traffic_class="batch")
    assert created["traffic_class"] == "batch"
    interactive = await api.service_key(name)
    assert interactive["traffic_class"] == "interactive"
    authenticator = api.app.state.authenticator
    assert (await authenticator.authenticate(f"Bearer {created['key']}")).traffic_class == "batch"
    assert (await authenticator.authenticate(f"Bearer {interactive['key']}")).traffic_class == "interactive"
    bad = await api.call("POST", f"/tenants/{name}/keys", json={"name": "x", "traffic_class": "bulk"})
    assert bad.status_code == 400 and error_of(bad)["param"] == "traffic_class"


def test_share_and_class_from_the_command_line(cli):  # noqa: F811
    name = f"f-{uuid.uuid4().hex[:8]}"
    assert cli("tenants", "create", name)[0] == 0
    policy = json.loads(cli("quota", "set", name, "--share", "2.5", "--format", "json")[1])
    assert policy["share"] == 2.5
    policy = json.loads(cli("quota", "set", name, "--tokens-per-day", "50", "--format", "json")[1])
    assert policy["share"] == 2.5 and policy["tokens_per_day"] == 50  # other flags leave it alone
    assert json.loads(cli("quota", "set", name, "--share", "none", "--format", "json")[1])["share"] is None
    created = json.loads(cli("keys", "create", "--tenant", name, "--class", "batch", "--format", "json")[1])
    assert created["traffic_class"] == "batch"
    assert "batch" in cli("keys", "list", "--tenant", name)[1]

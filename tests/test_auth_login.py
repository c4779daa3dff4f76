"""`agencyllm login` helpers: device grant, token cache and refresh, against the local issuer."""

from __future__ import annotations

import stat
import time

import pytest
from oidc_issuer import LocalOIDCIssuer

from agencyllm.auth.login import (
    LoginError,
    TokenCache,
    cached_access_token,
    default_token_path,
    device_login,
    refresh_tokens,
)
from agencyllm.auth.oidc import OIDCVerifier


@pytest.fixture
def cache(tmp_path):
    return TokenCache(tmp_path / "config" / "agencyllm" / "token.json")


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_token_path() == tmp_path / "agencyllm" / "token.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert str(default_token_path()).endswith(".config/agencyllm/token.json")


def test_cache_permissions_and_atomic_write(cache):
    cache.path.parent.mkdir(parents=True, mode=0o755)
    cache.path.parent.chmod(0o755)
    cache.save({"access_token": "a"})
    cache.save({"access_token": "b"})
    assert cache.load() == {"access_token": "b"}
    assert mode(cache.path) == 0o600 and mode(cache.path.parent) == 0o700
    assert [p.name for p in cache.path.parent.iterdir()] == ["token.json"]  # no temp files left
    cache.path.write_text("not json")
    assert cache.load() is None
    cache.clear()
    assert cache.load() is None and cached_access_token(cache) is None


async def test_device_login_and_refresh(oidc_issuer, cache):
    prompts: list[str] = []
    sleeps: list[float] = []
    oidc_issuer.device_pending_polls = 1
    try:
        record = device_login(oidc_issuer.issuer, print_fn=prompts.append, cache=cache, sleep=sleeps.append)
    finally:
        oidc_issuer.device_pending_polls = 0
    assert "ABCD-EFGH" in prompts[0] and oidc_issuer.issuer + "/device" in prompts[0]
    assert sleeps == [5.0]  # one authorization_pending answer, polled at the advertised interval
    assert record["access_token"] not in "".join(prompts)
    assert mode(cache.path) == 0o600 and mode(cache.path.parent) == 0o700
    assert cached_access_token(cache) == record["access_token"]

    verifier = OIDCVerifier(oidc_issuer.issuer, "agencyllm")
    try:
        claims = await verifier.verify(record["access_token"])
        assert claims["azp"] == "agencyllm-cli"

        # Expired access token: cached_access_token refreshes with the refresh token.
        cache.save({**record, "expires_at": time.time() - 1})
        fresh = cached_access_token(cache)
        assert fresh and fresh != record["access_token"]
        assert (await verifier.verify(fresh))["sub"] == claims["sub"]
        stored = cache.load()
        assert stored["access_token"] == fresh and stored["refresh_token"] != record["refresh_token"]
    finally:
        await verifier.aclose()


def test_refresh_failures(oidc_issuer, cache):
    with pytest.raises(LoginError):
        refresh_tokens(cache)
    record = device_login(oidc_issuer.issuer, print_fn=lambda _: None, cache=cache, sleep=lambda _: None)
    # A refresh token the issuer no longer knows: signed out, and no token text in the error.
    cache.save({**record, "expires_at": 0, "refresh_token": "revoked-refresh-token"})
    with pytest.raises(LoginError) as info:
        refresh_tokens(cache)
    assert "revoked-refresh-token" not in str(info.value) and "invalid_grant" in str(info.value)
    assert cached_access_token(cache) is None
    cache.save({**record, "expires_at": 0, "refresh_expires_at": time.time() - 1})
    with pytest.raises(LoginError, match="expired"):
        refresh_tokens(cache)


def test_issuer_unreachable(cache):
    issuer = LocalOIDCIssuer().start()
    url = issuer.issuer
    issuer.stop()
    with pytest.raises(LoginError, match="cannot reach the issuer"):
        device_login(url, print_fn=lambda _: None, cache=cache, timeout=2)
    assert not cache.path.exists()


def test_only_keycloak_realms(cache):
    with pytest.raises(LoginError, match="not a Keycloak realm URL"):
        device_login("https://login.agency.example/oauth2", print_fn=lambda _: None, cache=cache)

"""OIDCVerifier against the local Keycloak-shaped issuer, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from oidc_issuer import LocalOIDCIssuer, new_rsa_key

from agencyllm.auth.oidc import AuthenticationError, OIDCVerifier


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict, payload: dict, signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(signature)


@pytest.fixture
async def verifier(oidc_issuer: LocalOIDCIssuer):
    v = OIDCVerifier(oidc_issuer.issuer, "agencyllm")
    yield v
    await v.aclose()


async def rejected(verifier: OIDCVerifier, token: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(token)
    err = info.value
    assert str(err) == err.public_message == "Invalid or expired credentials"
    if len(token) >= 10:  # shorter strings could match ordinary words of a reason
        assert token not in err.reason and token not in repr(err)
    return err


async def test_valid_keycloak_token(verifier, oidc_issuer):
    claims = await verifier.verify(oidc_issuer.mint(realm_roles=["llm-user"], groups=["office-a"]))
    assert claims["iss"] == oidc_issuer.issuer
    assert claims["aud"] == ["agencyllm", "account"]
    assert claims["preferred_username"] == "jdoe"
    assert "llm-user" in claims["realm_access"]["roles"]


async def test_audience_as_string_and_within_leeway(verifier, oidc_issuer):
    now = time.time()
    await verifier.verify(oidc_issuer.mint(aud="agencyllm"))
    # Expired 10 s ago, issued 10 s in the future: both inside the 30 s leeway.
    await verifier.verify(oidc_issuer.mint(exp=int(now) - 10, iat=int(now) - 300))
    await verifier.verify(oidc_issuer.mint(iat=int(now) + 10, nbf=int(now) + 10))


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "eyJ.eyJ.sig", "x" * 40000, "Bearer x.y.z"])
async def test_malformed_and_garbage(verifier, token):
    await rejected(verifier, token)


async def test_alg_none(verifier, oidc_issuer):
    claims = oidc_issuer.claims()
    await rejected(verifier, craft({"alg": "none", "typ": "JWT", "kid": oidc_issuer.active_kid}, claims))
    await rejected(verifier, craft({"alg": "None", "typ": "JWT", "kid": oidc_issuer.active_kid}, claims))


async def test_hs256_signed_with_public_key_pem(verifier, oidc_issuer):
    header = {"alg": "HS256", "typ": "JWT", "kid": oidc_issuer.active_kid}
    unsigned = craft(header, oidc_issuer.claims()).rsplit(".", 1)[0]
    mac = hmac.new(oidc_issuer.public_key_pem(), unsigned.encode(), hashlib.sha256).digest()
    err = await rejected(verifier, unsigned + "." + b64(mac))
    assert "algorithm" in err.reason


async def test_alg_must_match_key(verifier, oidc_issuer):
    # ES256 header naming an RSA key; PS256 against a JWK pinned to RS256.
    await rejected(
        verifier, craft({"alg": "ES256", "typ": "JWT", "kid": oidc_issuer.active_kid}, oidc_issuer.claims(), b"x" * 64)
    )
    await rejected(verifier, oidc_issuer.mint(alg="PS256"))


async def test_tampered_payload(verifier, oidc_issuer):
    head, _, sig = oidc_issuer.mint(realm_roles=["llm-user"]).split(".")
    forged = oidc_issuer.claims(realm_roles=["llm-platform-admin"])
    await rejected(verifier, f"{head}.{b64(json.dumps(forged).encode())}.{sig}")


async def test_wrong_issuer(verifier, oidc_issuer):
    await rejected(verifier, oidc_issuer.mint(iss=oidc_issuer.base_url + "/realms/other"))
    await rejected(verifier, oidc_issuer.mint(iss=oidc_issuer.issuer + "/"))


async def test_wrong_and_missing_audience(verifier, oidc_issuer):
    await rejected(verifier, oidc_issuer.mint(aud=["account"]))
    await rejected(verifier, oidc_issuer.mint(aud="agencyllm-cli"))
    await rejected(verifier, oidc_issuer.mint(drop=["aud"]))


async def test_expired(verifier, oidc_issuer):
    now = int(time.time())
    await rejected(verifier, oidc_issuer.mint(now=now - 3600, lifetime=300))
    await rejected(verifier, oidc_issuer.mint(exp=now - 31))


async def test_not_yet_valid(verifier, oidc_issuer):
    now = int(time.time())
    await rejected(verifier, oidc_issuer.mint(nbf=now + 120))
    await rejected(verifier, oidc_issuer.mint(iat=now + 120))


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "iss"])
async def test_required_claims(verifier, oidc_issuer, claim):
    await rejected(verifier, oidc_issuer.mint(drop=[claim]))


async def test_empty_sub_and_non_numeric_times(verifier, oidc_issuer):
    await rejected(verifier, oidc_issuer.mint(sub=""))
    await rejected(verifier, oidc_issuer.mint(exp=str(int(time.time()) + 300)))
    await rejected(verifier, oidc_issuer.mint(exp=True))


async def test_keycloak_id_token_is_not_an_access_token(verifier, oidc_issuer):
    await rejected(verifier, oidc_issuer.mint(typ="ID"))


async def test_unknown_kid_and_foreign_key(verifier, oidc_issuer):
    await rejected(verifier, oidc_issuer.mint(kid="not-published"))
    await rejected(verifier, craft({"alg": "RS256", "typ": "JWT"}, oidc_issuer.claims(), b"s" * 256))
    # Signed by a key nobody published, under a published kid.
    await rejected(verifier, oidc_issuer.mint(signing_key=new_rsa_key()))


async def test_encryption_key_is_not_a_signing_key(verifier, oidc_issuer):
    enc = oidc_issuer.enc_key
    err = await rejected(verifier, oidc_issuer.mint(kid=enc.kid, signing_key=enc.private_key))
    assert err.reason == "unknown kid"


async def test_ec_key_with_es256():
    # An issuer configured for ES256 (JWKS entry built by hand: the local issuer is RSA-only).
    import jwt

    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="ec1", use="sig", alg="ES256")
    claims = {
        "iss": "https://kc/realms/a",
        "aud": "agencyllm",
        "sub": "u",
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
    }
    token = jwt.encode(claims, private, algorithm="ES256", headers={"kid": "ec1"})
    verifier = OIDCVerifier("https://kc/realms/a", "agencyllm")
    verifier._keys = verifier._parse_jwks({"keys": [jwk]})  # skip HTTP: only the EC path is under test  # noqa: SLF001 (the project's own object, white-box)
    verifier._keys_loaded_at = time.time()  # noqa: SLF001 (the project's own object, white-box)
    assert (await verifier.verify(token))["sub"] == "u"
    rs = jwt.encode(claims, new_rsa_key(), algorithm="RS256", headers={"kid": "ec1"})
    with pytest.raises(AuthenticationError):
        await verifier.verify(rs)


def test_constructor_rules():
    with pytest.raises(ValueError):
        OIDCVerifier("https://kc/realms/a", "agencyllm", leeway=61)
    for algs in (["HS256"], ["none"], ["RS256", "HS512"], []):
        with pytest.raises(ValueError):
            OIDCVerifier("https://kc/realms/a", "agencyllm", algorithms=algs)


async def test_discovery(verifier, oidc_issuer):
    doc = await verifier.discovery()
    assert doc["device_authorization_endpoint"].endswith("/protocol/openid-connect/auth/device")
    assert doc["token_endpoint"].endswith("/protocol/openid-connect/token")


async def test_discovery_issuer_must_match(fresh_oidc_issuer):
    fresh_oidc_issuer.discovery_issuer_override = "https://evil.example/realms/agency"
    v = OIDCVerifier(fresh_oidc_issuer.issuer, "agencyllm")
    try:
        await rejected(v, fresh_oidc_issuer.mint())
    finally:
        await v.aclose()
    # A trailing slash is a different issuer too.
    fresh_oidc_issuer.discovery_issuer_override = None
    v = OIDCVerifier(fresh_oidc_issuer.issuer + "/", "agencyllm")
    try:
        await rejected(v, fresh_oidc_issuer.mint())
    finally:
        await v.aclose()


async def test_unknown_kid_flood_fetches_jwks_at_most_once(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    v = OIDCVerifier(issuer.issuer, "agencyllm")
    try:
        await v.verify(issuer.mint())  # warm: discovery + first JWKS load
        before = issuer.jwks_fetches
        tokens = [issuer.mint(kid=f"unknown-{i % 7}") for i in range(200)]
        results = await asyncio.gather(*(v.verify(t) for t in tokens), return_exceptions=True)
        assert all(isinstance(r, AuthenticationError) for r in results)
        assert issuer.jwks_fetches - before <= 1
        # Still cooling down: a second flood fetches nothing.
        await asyncio.gather(*(v.verify(t) for t in tokens[:50]), return_exceptions=True)
        assert issuer.jwks_fetches - before <= 1
    finally:
        await v.aclose()


async def test_cold_flood_shares_one_fetch(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    v = OIDCVerifier(issuer.issuer, "agencyllm")
    try:
        tokens = [issuer.mint(kid="unknown") for _ in range(100)] + [issuer.mint() for _ in range(100)]
        results = await asyncio.gather(*(v.verify(t) for t in tokens), return_exceptions=True)
        assert all(isinstance(r, AuthenticationError) for r in results[:100])
        assert all(isinstance(r, dict) for r in results[100:])
        assert issuer.jwks_fetches == 1 and issuer.discovery_fetches == 1
    finally:
        await v.aclose()


async def test_refetch_allowed_again_after_cooldown(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    offset = [0.0]
    v = OIDCVerifier(issuer.issuer, "agencyllm", clock=lambda: time.time() + offset[0])
    try:
        await v.verify(issuer.mint())
        await rejected(v, issuer.mint(kid="later"))
        await rejected(v, issuer.mint(kid="later"))
        assert issuer.jwks_fetches == 2
        offset[0] = 31.0
        await rejected(v, issuer.mint(kid="later", now=time.time() + 31))
        assert issuer.jwks_fetches == 3
    finally:
        await v.aclose()


async def test_rotation_without_restart(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    v = OIDCVerifier(issuer.issuer, "agencyllm")
    try:
        old_token = issuer.mint()
        await v.verify(old_token)
        old_kid = issuer.active_kid
        new_kid = issuer.rotate()
        new_token = issuer.mint()
        assert json.loads(base64.urlsafe_b64decode(new_token.split(".")[0] + "=="))["kid"] == new_kid
        await v.verify(new_token)  # unknown kid -> one refetch -> accepted
        await v.verify(old_token)  # passive key still published
        await v.verify(issuer.mint(kid=old_kid))
        assert issuer.jwks_fetches == 2
    finally:
        await v.aclose()


async def test_withdrawn_key_stops_validating_after_max_age(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    offset = [0.0]
    v = OIDCVerifier(issuer.issuer, "agencyllm", clock=lambda: time.time() + offset[0], jwks_max_age=600)
    try:
        old_kid = issuer.active_kid
        await v.verify(issuer.mint())
        issuer.rotate()
        issuer.retire(old_kid)
        offset[0] = 601.0
        await rejected(v, issuer.mint(kid=old_kid, now=time.time() + 601))
    finally:
        await v.aclose()


async def test_issuer_down_cached_keys_still_validate(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    v = OIDCVerifier(issuer.issuer, "agencyllm", http_timeout=1.0)
    try:
        await v.verify(issuer.mint())
        issuer.stop()
        assert (await v.verify(issuer.mint(username="alice")))["preferred_username"] == "alice"
        err = await rejected(v, issuer.mint(kid="new-while-down"))
        assert "JWKS fetch failed" in err.reason
        issuer.restart()
        await v.verify(issuer.mint())
    finally:
        await v.aclose()


async def test_issuer_down_before_first_use(fresh_oidc_issuer):
    issuer = fresh_oidc_issuer
    token = issuer.mint()
    issuer.stop()
    offset = [0.0]
    v = OIDCVerifier(issuer.issuer, "agencyllm", http_timeout=1.0, clock=lambda: time.time() + offset[0])
    try:
        err = await rejected(v, token)
        assert "discovery failed" in err.reason
        issuer.restart()
        await rejected(v, token)  # failed fetches are throttled too
        offset[0] = 5.0  # with no keys at all, retries come after 5 s rather than the full cooldown
        assert (await v.verify(token))["sub"]
    finally:
        await v.aclose()

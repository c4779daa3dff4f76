"""Identity for agencyllm: OIDC token verification, roles and tenant hints, API keys.

Pure identity logic: no database access and no imports from the serving or quota layers.
`agencyllm.auth.login` (CLI only) is not imported here.
"""

from agencyllm.auth.apikeys import MintedKey, hash_key, looks_like_api_key, mint_key, parse_key, verify_key_hash
from agencyllm.auth.oidc import AuthenticationError, OIDCVerifier
from agencyllm.auth.principal import Principal, Role, RoleNames, TokenIdentity, identity_from_claims

__all__ = [
    "AuthenticationError",
    "MintedKey",
    "OIDCVerifier",
    "Principal",
    "Role",
    "RoleNames",
    "TokenIdentity",
    "hash_key",
    "identity_from_claims",
    "looks_like_api_key",
    "mint_key",
    "parse_key",
    "verify_key_hash",
]

"""Open WebUI, the staff chat front end, as the platform runs it: its environment, defined once.

`FIXED_ENVIRONMENT` holds what every install sets the same way: the air gap (no telemetry, no
update checks, no downloads), sign-in only through the realm, models only from the platform, and
each person forwarded to the gateway. `install_environment` adds what differs per install. The
Helm chart and the Ansible role read generated copies of `FIXED_ENVIRONMENT`
(`scripts/gen_schemas.py` writes them; a test keeps them current); `agencyllm up --chat` uses it
directly. See docs/chat.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# The release the recipes, the image and the end-to-end test are pinned to.
OPEN_WEBUI_VERSION = "0.12.4"
OPEN_WEBUI_IMAGE = "ghcr.io/open-webui/open-webui"
OPEN_WEBUI_PORT = 8080
# Realm client Open WebUI signs people in with (infra/keycloak/agencyllm-realm.json).
OPEN_WEBUI_CLIENT_ID = "open-webui"

FIXED_ENVIRONMENT: dict[str, str] = {
    # Models come only from the platform, through one OpenAI connection with the front-end key.
    "ENABLE_OLLAMA_API": "false",
    # Named, so that Open WebUI does not probe Docker's host names for an Ollama at start-up.
    "OLLAMA_BASE_URL": "http://127.0.0.1:11434",
    "ENABLE_OPENAI_API": "true",
    "ENABLE_DIRECT_CONNECTIONS": "false",
    # The environment is the configuration: nothing an admin clicks overrides it after a restart.
    "ENABLE_PERSISTENT_CONFIG": "false",
    # Each request carries the signed-in person (the gateway checks them against the realm).
    "ENABLE_FORWARD_USER_INFO_HEADERS": "true",
    # Sign-in only through the realm; accounts are made at first sign-in, with roles from the
    # realm's roles (staff without a platform role cannot sign in).
    "ENABLE_LOGIN_FORM": "false",
    "ENABLE_SIGNUP": "false",
    "ENABLE_OAUTH_SIGNUP": "true",
    "OAUTH_MERGE_ACCOUNTS_BY_EMAIL": "false",
    "OAUTH_PROVIDER_NAME": "Agency sign-in",
    "OAUTH_SCOPES": "openid email profile",
    "OAUTH_CODE_CHALLENGE_METHOD": "S256",
    "ENABLE_OAUTH_ROLE_MANAGEMENT": "true",
    "OAUTH_ROLES_CLAIM": "realm_access.roles",
    "OAUTH_ALLOWED_ROLES": "llm-user,llm-tenant-admin,llm-platform-admin",
    "OAUTH_ADMIN_ROLES": "llm-platform-admin",
    "DEFAULT_USER_ROLE": "user",
    # Every signed-in person sees the platform's models: the platform, not Open WebUI, decides who
    # may use which (a tenant's `allowed_models`; a refused model is a clear 403 in the chat).
    "BYPASS_MODEL_ACCESS_CONTROL": "true",
    # Open WebUI's admins do not read or export other people's chats.
    "ENABLE_ADMIN_CHAT_ACCESS": "false",
    "ENABLE_ADMIN_EXPORT": "false",
    # The air gap: no telemetry, no update checks, nothing downloaded, nothing shared outside.
    # (The three telemetry switches are the upstream image's; set here too for installs from PyPI.)
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "ENABLE_VERSION_UPDATE_CHECK": "false",
    "SCARF_NO_ANALYTICS": "true",
    "DO_NOT_TRACK": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "ENABLE_COMMUNITY_SHARING": "false",
    "ENABLE_WEB_SEARCH": "false",
    "ENABLE_IMAGE_GENERATION": "false",
    "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
    "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
    "WHISPER_MODEL_AUTO_UPDATE": "false",
    # No local embedding model exists offline (its default would be downloaded): documents are
    # given to the model whole instead of through Open WebUI's own retrieval.
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
    # Open WebUI's built-in tools (its memory, notes, chat search, …) would add some 18,000 prompt
    # tokens to every message, charged to the person, and act on Open WebUI's own stores.
    "DEFAULT_MODEL_METADATA": '{"capabilities": {"builtin_tools": false}}',
    # Background calls Open WebUI makes for itself are charged to the person: keep only titles.
    "ENABLE_TITLE_GENERATION": "true",
    "ENABLE_FOLLOW_UP_GENERATION": "false",
    "ENABLE_TAGS_GENERATION": "false",
    "ENABLE_AUTOCOMPLETE_GENERATION": "false",
    "ENABLE_RETRIEVAL_QUERY_GENERATION": "false",
}

# Chat history. Off: every chat is temporary and Open WebUI's database keeps no conversation (what
# a tenant that keeps no content needs); on: conversations stay in its database until people
# delete them (docs/chat.md, "What Open WebUI keeps").
HISTORY_OFF = {"USER_PERMISSIONS_CHAT_TEMPORARY": "true", "USER_PERMISSIONS_CHAT_TEMPORARY_ENFORCED": "true"}
HISTORY_ON = {"USER_PERMISSIONS_CHAT_TEMPORARY": "true", "USER_PERMISSIONS_CHAT_TEMPORARY_ENFORCED": "false"}


@dataclass(frozen=True)
class ChatInstall:
    """What differs per install (secrets are passed in, never logged)."""

    api_base_url: str  # the platform's /v1, as Open WebUI reaches it
    frontend_key: str
    public_url: str  # where staff open the chat (WEBUI_URL; the realm client's redirect base)
    oidc_issuer: str
    client_secret: str
    database_url: str
    secret_key: str
    data_dir: str
    keep_history: bool = False
    client_id: str = OPEN_WEBUI_CLIENT_ID

    def __repr__(self) -> str:
        return f"ChatInstall(api_base_url={self.api_base_url!r}, public_url={self.public_url!r})"


def install_environment(install: ChatInstall) -> dict[str, str]:
    public_url = install.public_url.rstrip("/")
    return (
        FIXED_ENVIRONMENT
        | (HISTORY_ON if install.keep_history else HISTORY_OFF)
        | {
            "OPENAI_API_BASE_URL": install.api_base_url.rstrip("/"),
            "OPENAI_API_KEY": install.frontend_key,
            # Signs the forwarded identity with the front-end key: the gateway checks it with the key.
            "FORWARD_USER_INFO_HEADER_JWT_SECRET": install.frontend_key,
            "WEBUI_URL": public_url,
            "CORS_ALLOW_ORIGIN": public_url,
            "OPENID_PROVIDER_URL": f"{install.oidc_issuer.rstrip('/')}/.well-known/openid-configuration",
            "OPENID_REDIRECT_URI": f"{public_url}/oauth/oidc/callback",
            "OAUTH_CLIENT_ID": install.client_id,
            "OAUTH_CLIENT_SECRET": install.client_secret,
            "DATABASE_URL": install.database_url,
            "WEBUI_SECRET_KEY": install.secret_key,
            "DATA_DIR": install.data_dir,
        }
    )

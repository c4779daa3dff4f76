"""The one settings object: every knob the platform reads from its environment (`AGENCYLLM_*`),
validated when it is read, so bad settings stop `agencyllm up` and the application builder with
the variable's name; `ClientSettings` holds the few the admin CLI reads on an admin's machine.
Nothing else reads `AGENCYLLM_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AGENCYLLM_"


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "agencyllm"


class SettingsError(ValueError):
    """Settings that cannot work, said per environment variable (raised where they are read, so
    `agencyllm up` and the application builder stop before anything starts)."""

    def __init__(self, exc: ValidationError) -> None:
        lines = []
        for error in exc.errors(include_url=False):
            name = ENV_PREFIX + str(error["loc"][0]).upper() if error.get("loc") else "settings"
            lines.append(f"{name}: {str(error['msg']).removeprefix('Value error, ')}")
        super().__init__("invalid settings: " + "; ".join(lines))


class _Validated(BaseSettings):
    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(exc) from None


def _http_url(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an http(s) URL, not {value!r}")
    return value


class Settings(_Validated):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Where the platform keeps its state when no external database is given.
    data_dir: Path = Field(default_factory=default_data_dir)
    # External Postgres (production). Unset: the embedded server under `data_dir/postgres`.
    database_url: SecretStr | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Models YAML (see docs/configuration.md). Unset: the placeholder model.
    config: Path | None = None

    # Identity (Keycloak). Unset issuer: API keys only.
    oidc_issuer: str | None = None
    oidc_audience: str = "agencyllm"
    # Claim that names the caller's tenant: `groups` (matched against tenants' Keycloak groups)
    # or any claim holding the tenant name directly (e.g. `tenant`).
    oidc_tenant_claim: str = "groups"
    oidc_leeway_seconds: int = Field(default=30, ge=0, le=60)
    role_user: str = "llm-user"
    role_tenant_admin: str = "llm-tenant-admin"
    role_platform_admin: str = "llm-platform-admin"
    # The realm's directory client (client credentials, realm-management `view-users`): how the
    # gateway finds the person a trusted front end (Open WebUI) forwards. Unset: front-end keys
    # are refused. See docs/chat.md.
    oidc_directory_client_id: str | None = None
    oidc_directory_client_secret: SecretStr | None = None
    # How long a person's directory entry (tenant groups, roles, enabled) is reused.
    oidc_directory_cache_seconds: int = Field(default=60, ge=0, le=3600)

    # Quotas: calendar days and months are counted in this time zone.
    quota_timezone: str = "UTC"
    # Lease on a reservation; the reaper settles leases their ingress stopped renewing.
    reservation_lease_seconds: int = Field(default=120, ge=10)

    # Requests larger than this are refused with 413 before they are parsed.
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Bounds on one request's work, checked before admission: choices per prompt (`n`), and
    # prompts (completions) or inputs (embeddings) in one list.
    max_choices: int = Field(default=16, ge=1, le=128)
    max_prompts_per_request: int = Field(default=256, ge=1, le=2048)
    # Serve /docs and /openapi.json (off: they describe every route to anyone who asks).
    api_docs: bool = False
    # Browser origins allowed to call the API (none by default: the API is for SDKs and scripts).
    cors_origins: list[str] = []
    ingress_replicas: int = Field(default=1, ge=1)
    # Local run with one ingress replica: the replica serves the port itself, without Ray
    # Serve's proxy in between (serving/rayserve/ray_env.py): one process hop less per streamed chunk.
    direct_ingress: bool = True
    # Where Serve's proxy listens while the ingress replica serves `port` itself (it answers the
    # same routes there). Unset: a free port on the local run; `port` + 1 on a cluster.
    proxy_port: int | None = Field(default=None, ge=1, le=65535)
    # Opt-in, with direct ingress: the first generate model's engine replica (when it runs one
    # replica) serves the gateway itself, so its chunks cross no process boundary to the client;
    # but while that replica restarts, every route of the port is down (docs/operations.md).
    engine_gateway: bool = False

    # Files and Batch API (docs/api.md): the largest upload, and what one tenant's files may hold
    # in all (uploads and batch outputs, stored in Postgres).
    file_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024, le=1024**3)
    file_storage_bytes_per_tenant: int = Field(default=10 * 1024**3, ge=1024)
    batch_max_lines: int = Field(default=50_000, ge=1, le=1_000_000)
    # Batch lines each ingress replica runs at once (in the batch traffic class, behind
    # interactive requests in the engines' fair queues), and how long a line's lease lasts
    # without its worker renewing it (then another worker takes the line over).
    batch_concurrency: int = Field(default=8, ge=0, le=1024)
    batch_lease_seconds: float = Field(default=60.0, ge=5, le=3600)

    # Governance (docs/compliance/): audit records are kept this many days (never fewer than 90);
    # the usage ledger this many (unset: for ever). Content retention is a per-tenant opt-in.
    audit_retention_days: int = Field(default=365, ge=90)
    ledger_retention_days: int | None = Field(default=None, ge=1)
    # GET /metrics needs `Authorization: Bearer <this token>` (for Prometheus) or a
    # platform-admin credential; it is never public.
    metrics_token: SecretStr | None = None
    # Logical CPUs Ray may hand out on this host (local run). Unset: Ray's own count, at least 8.
    ray_num_cpus: int | None = None
    # Join this running Ray cluster (its head's GCS address, HOST:6379) instead of starting Ray on
    # this host (`agencyllm up --address`). The cluster's own nodes decide Ray's settings.
    ray_address: str | None = None
    # Keep the ingress replicas on the Ray head node, where the API port is served: the Ansible
    # install's firewall opens it there only. Unset: on the head when joining a cluster
    # (`ray_address`), anywhere otherwise (KubeRay runs Serve's proxy on every node).
    ingress_on_head: bool | None = None
    # Run the engines as on a CPU-only host even where vLLM sees an accelerator.
    force_cpu: bool = False
    # CPUs each ingress replica reserves in Ray. Unset: 1 where the cluster (local run: the host's
    # cores) has one per ingress replica beside the engines' placement bundles, else 0.
    ingress_cpus: float | None = Field(default=None, ge=0)
    # Ray Serve's per-request access log lines from the ingress, engines and HTTP proxy.
    access_log: bool = False

    # Staff chat beside the local run (`agencyllm up --chat`, docs/chat.md): Open WebUI's executable,
    # in a virtualenv of its own; where it listens; the realm client it signs staff in with; whether
    # it keeps chat history; its database (default: database `openwebui` on the platform's server).
    chat: bool = False
    chat_command: str = "open-webui"
    chat_host: str = "127.0.0.1"
    chat_port: int = Field(default=8080, ge=1, le=65535)
    chat_public_url: str | None = None
    chat_client_id: str = "open-webui"
    chat_client_secret: SecretStr | None = None
    chat_history: bool = False
    chat_database_url: SecretStr | None = None

    # Web console (/console, see docs/console.md). The URL users reach the platform at, as the
    # Keycloak realm's AGENCYLLM_PUBLIC_URL (https behind a TLS proxy); unset: each request's own.
    public_url: str | None = None
    # The realm's web client (authorization code + PKCE); its secret if the client is confidential.
    console_client_id: str = "agencyllm-gateway"
    console_client_secret: SecretStr | None = None
    # A console session ends after this many idle minutes, and this many hours after sign-in.
    console_idle_minutes: int = Field(default=30, ge=1, le=720)
    console_max_hours: int = Field(default=8, ge=1, le=24)
    # Encrypts session cookies; every ingress replica needs the same one. Unset: a random key
    # kept in DATA_DIR/console.key (enough when all replicas share one host).
    console_session_secret: SecretStr | None = None

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or "/" in value or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not a Ray head address; give HOST:PORT (the head's GCS port, e.g. 6379)")
        return value

    @property
    def ingress_pinned_to_head(self) -> bool:
        return self.ray_address is not None if self.ingress_on_head is None else self.ingress_on_head

    @field_validator("quota_timezone")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a time zone; use an IANA name such as 'UTC' or 'America/New_York'"
            ) from None
        return value

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer(cls, value: str | None) -> str | None:
        return _http_url(value or None, "the issuer")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return _http_url(value or None, "the public URL")


DEFAULT_URL = "http://127.0.0.1:8000"


class ClientSettings(_Validated):
    """What the admin CLI (`agencyllm admin`, `agencyllm login`) reads from its environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # The platform to call, and the credential to call it with (else `agencyllm login`'s token).
    url: str = DEFAULT_URL
    api_key: SecretStr | None = None
    # Where `agencyllm login` signs in.
    oidc_issuer: str | None = None
    # On the server itself: the bootstrap platform-admin key is read from DATA_DIR/admin.key.
    data_dir: Path = Field(default_factory=default_data_dir)

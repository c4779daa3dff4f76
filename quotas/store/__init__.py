"""Admin store: tenants, quota policies, API keys and usage reports, on one `AsyncSession`.

Every mutator is one transaction: it validates, writes, records an `AuditEvent` (who, what, when
in UTC, before/after as JSON) and commits; on any error it rolls back, so nothing is half-written.
Callers pass a session that is not inside `session.begin()`. Errors are `NotFound`, `Conflict`
and `Invalid`, which the admin API maps to 404, 409 and 400.

Modules: `errors`; `changes` (actors, the transaction and audit record every change uses, also
by `quotas.compliance`); `quota_rules` (the one `Quota` model); `tenants`; `policies`; `keys`;
`usage`. Callers use this package's names (`from agencyllm.quotas import store`).

May import `agencyllm.auth`, `quotas.audit`, `quotas.db` and `quotas.models`; never the ledger,
compliance or `agencyllm.serving`.
"""

from agencyllm.quotas.store.changes import Actor, SystemActor, jsonable, record_change, transaction, utcnow
from agencyllm.quotas.store.errors import Conflict, Invalid, NotFound, StoreError
from agencyllm.quotas.store.keys import (
    LAST_USED_RESOLUTION,
    ActiveKey,
    CreatedKey,
    create_key,
    find_active_key,
    get_key,
    key_snapshot,
    list_keys,
    revoke_key,
)
from agencyllm.quotas.store.policies import get_quota, quota_snapshot, set_quota, tenant_shares
from agencyllm.quotas.store.quota_rules import (
    QUOTA_FIELDS,
    QUOTA_LIMIT_FIELDS,
    QUOTA_MAXIMUMS,
    Quota,
    validate_quota,
)
from agencyllm.quotas.store.tenants import (
    SYSTEM_TENANT,
    create_tenant,
    delete_tenant,
    ensure_tenant,
    get_tenant,
    list_tenants,
    set_tenant_status,
    tenant_for_hints,
    tenant_snapshot,
    update_tenant,
)
from agencyllm.quotas.store.usage import GROUP_BY, day_bounds, usage_report

__all__ = [
    "GROUP_BY",
    "LAST_USED_RESOLUTION",
    "QUOTA_FIELDS",
    "QUOTA_LIMIT_FIELDS",
    "QUOTA_MAXIMUMS",
    "SYSTEM_TENANT",
    "ActiveKey",
    "Actor",
    "Conflict",
    "CreatedKey",
    "Invalid",
    "NotFound",
    "Quota",
    "StoreError",
    "SystemActor",
    "create_key",
    "create_tenant",
    "day_bounds",
    "delete_tenant",
    "ensure_tenant",
    "find_active_key",
    "get_key",
    "get_quota",
    "get_tenant",
    "jsonable",
    "key_snapshot",
    "list_keys",
    "list_tenants",
    "quota_snapshot",
    "record_change",
    "revoke_key",
    "set_quota",
    "set_tenant_status",
    "tenant_for_hints",
    "tenant_shares",
    "tenant_snapshot",
    "transaction",
    "update_tenant",
    "usage_report",
    "utcnow",
    "validate_quota",
]

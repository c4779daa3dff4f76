"""The feedback channel's store: staff rate a response and say what was wrong with it
(OMB M-25-21 / M-26-04); admins list and export it per tenant."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas import store
from agencyllm.quotas.models import Feedback, FeedbackCategory, Tenant, UsageRecord

MAX_COMMENT_CHARS = 4000


def feedback_snapshot(item: Feedback, tenant: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "tenant": tenant,
        "request_id": item.request_id,
        "subject": item.subject,
        "username": item.username,
        "rating": item.rating,
        "category": item.category,
        "comment": item.comment,
        "created_at": item.created_at.isoformat(),
    }


async def submit_feedback(
    session: AsyncSession,
    *,
    tenant_name: str,
    subject: str,
    username: str | None,
    request_id: str | None,
    rating: int | None,
    category: str,
    comment: str | None,
) -> dict[str, Any]:
    if category not in tuple(FeedbackCategory):
        raise store.Invalid(f"'category' must be one of {', '.join(FeedbackCategory)}.", param="category")
    category = FeedbackCategory(category).value  # stored and answered as the plain string
    if rating is not None and (isinstance(rating, bool) or not 1 <= rating <= 5):
        raise store.Invalid("'rating' must be an integer from 1 to 5.", param="rating")
    if comment is not None:
        comment = comment.strip() or None
        if comment and len(comment) > MAX_COMMENT_CHARS:
            raise store.Invalid(f"'comment' must be at most {MAX_COMMENT_CHARS} characters.", param="comment")
        if comment and "\x00" in comment:
            raise store.Invalid("'comment' must not contain NUL characters.", param="comment")
    if rating is None and comment is None and category == "other":
        raise store.Invalid("Give a rating, a category other than 'other', or a comment.")
    async with store.transaction(session):
        tenant = await store.get_tenant(session, tenant_name)
        if request_id is not None:
            # Only a request of the caller's own tenant: nobody learns other tenants' ids.
            found = await session.scalar(
                select(UsageRecord.id).where(UsageRecord.request_id == request_id, UsageRecord.tenant_id == tenant.id)
            )
            if found is None:
                raise store.NotFound(f"No request '{request_id}' in your tenant.", param="request_id")
        item = Feedback(
            tenant_id=tenant.id,
            request_id=request_id,
            subject=subject,
            username=username,
            rating=rating,
            category=category,
            comment=comment,
            created_at=store.utcnow(),
        )
        session.add(item)
        await session.flush()
        snapshot = feedback_snapshot(item, tenant.name)
    return snapshot


async def list_feedback(
    session: AsyncSession,
    *,
    tenant_names: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    category: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Newest first. `tenant_names` None: every tenant (platform admins)."""
    query = (
        select(Feedback, Tenant.name)
        .join(Tenant, Tenant.id == Feedback.tenant_id)
        .order_by(Feedback.created_at.desc(), Feedback.id.desc())
        .limit(limit)
    )
    if tenant_names is not None:
        query = query.where(Tenant.name.in_(list(tenant_names)))
    if since is not None:
        query = query.where(Feedback.created_at >= since)
    if until is not None:
        query = query.where(Feedback.created_at < until)
    if category is not None:
        query = query.where(Feedback.category == category)
    return [feedback_snapshot(item, name) for item, name in (await session.execute(query)).all()]

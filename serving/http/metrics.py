"""GET /metrics: Prometheus text for the platform, never public.

A scrape must send `Authorization: Bearer $AGENCYLLM_METRICS_TOKEN` (or a platform-admin
credential). Inside Ray the answer is this node's Ray metrics agent filtered to the platform's
own series (`ray_agencyllm_*`: requests, tokens and refusals per tenant and model, TTFT and
end-to-end histograms) and the engines' vLLM series (`ray_vllm_*`), plus
`agencyllm_reservations_open` read from Postgres (cluster-wide). Outside Ray (tests, tools): this
process' prometheus_client registry. docs/compliance/metrics.md has the scrape configs.
"""

from __future__ import annotations

import hmac
import sys

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response

from agencyllm.serving.gateway.deps import get_current_principal, get_database, get_settings
from agencyllm.serving.gateway.errors import OpenAIError

router = APIRouter()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SERIES_PREFIXES = ("ray_agencyllm_", "ray_vllm")


async def _allowed(request: Request) -> bool:
    settings = get_settings(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if expected and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode()):
        return True
    principal = await get_current_principal(request)  # 401 for bad credentials
    return principal.is_platform_admin


_agent_url: list[str] = []


def _ray_agent_url() -> str | None:
    """This node's Ray metrics agent, found through Ray's public API (once per process)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    if not _agent_url:
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
                _agent_url.append(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics")
    return _agent_url[0] if _agent_url else None


def _platform_series(text: str) -> str:
    keep = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
        if name.startswith(SERIES_PREFIXES):
            keep.append(line)
    return "\n".join(keep) + "\n" if keep else ""


async def _reservations_open(request: Request) -> str:
    pool = await get_database(request).pool()
    count = await pool.fetchval("SELECT count(*) FROM quota_reservations")
    return (
        "# HELP agencyllm_reservations_open Admitted requests not yet settled (all replicas)\n"
        "# TYPE agencyllm_reservations_open gauge\n"
        f"agencyllm_reservations_open {count}\n"
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    if not await _allowed(request):
        raise OpenAIError(403, "Metrics need the metrics token or the platform administrator role.")
    url = _ray_agent_url()
    if url is None:
        from prometheus_client import generate_latest

        body = generate_latest().decode()
    else:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.get(url)
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            raise OpenAIError(503, f"The Ray metrics agent did not answer ({type(exc).__name__}).") from None
        body = _platform_series(answer.text)
    return Response(body + await _reservations_open(request), media_type=CONTENT_TYPE)

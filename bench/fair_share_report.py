"""The fair-share benchmark's table and verdicts: each tenant's time to first token and tokens/s
with and without the others' floods, plain vLLM against agencyllm."""

from __future__ import annotations


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def ratio(value: float, base: float) -> str:
    return f"{value / max(base, 1e-9):.2f}"


def verdicts(r: dict) -> dict[str, bool]:
    quiet = r["quiet"]["probe_ttft_ms"]["p50"] or 0
    batch, inter = r["batch_flood"]["probe_ttft_ms"], r["interactive_flood"]["probe_ttft_ms"]
    b_alone = r["b_alone"]["tokens_per_s"]["B_batch"] or 1e-9
    equal = r["equal_floods"]["tokens_per_s"]
    low, high = min(equal.values()), max(equal.values())
    return {
        "batch flood: A p50 <= 2x quiet": (batch["p50"] or 1e9) <= 2 * quiet,
        "batch flood: A p99 <= 1 s": (batch["p99"] or 1e9) <= 1000,
        "interactive flood: A p50 <= 500 ms": (inter["p50"] or 1e9) <= 500,
        "interactive flood: A p90 <= 1 s": (inter["p90"] or 1e9) <= 1000,
        "B keeps >= 85% with A light": r["batch_flood"]["tokens_per_s"]["B_batch"] / b_alone >= 0.85,
        "equal shares within 10%": high > 0 and (high - low) / high <= 0.10,
    }


def table(results: dict) -> str:
    rows = [
        (
            "A TTFT quiet p50 / p99 (ms)",
            lambda r: f"{fmt(r['quiet']['probe_ttft_ms']['p50'])} / {fmt(r['quiet']['probe_ttft_ms']['p99'])}",
        ),
        (
            "A TTFT, B batch flood, p50 / p99",
            lambda r: (
                f"{fmt(r['batch_flood']['probe_ttft_ms']['p50'])} / {fmt(r['batch_flood']['probe_ttft_ms']['p99'])}"
            ),
        ),
        (
            "A TTFT, B interactive flood, p50 / p90",
            lambda r: (
                f"{fmt(r['interactive_flood']['probe_ttft_ms']['p50'])} / "
                f"{fmt(r['interactive_flood']['probe_ttft_ms']['p90'])}"
            ),
        ),
        ("B tokens/s alone", lambda r: fmt(r["b_alone"]["tokens_per_s"]["B_batch"])),
        (
            "B tokens/s with A light (ratio)",
            lambda r: (
                f"{fmt(r['batch_flood']['tokens_per_s']['B_batch'])} "
                f"({ratio(r['batch_flood']['tokens_per_s']['B_batch'], r['b_alone']['tokens_per_s']['B_batch'])})"
            ),
        ),
        (
            "B / C tokens/s, equal shares",
            lambda r: f"{fmt(r['equal_floods']['tokens_per_s']['B'])} / {fmt(r['equal_floods']['tokens_per_s']['C'])}",
        ),
    ]
    names = list(results)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")
    lines.append("")
    for name in names:
        lines.append(
            f"{name}: " + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in verdicts(results[name]).items())
        )
    return "\n".join(lines)

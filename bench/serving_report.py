"""The serving benchmark's tables: each target against plain vLLM, in the shape of the serving-path
issue's target table."""

from __future__ import annotations

from bench.serving_common import FRONT_END, GROUP_PREFIX, OURS, PLAIN, RAY_LLM, TARGETS, family

# ---- report ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def deltas(summary: dict) -> dict:
    """Each target against plain vLLM: added latency (ms) and throughput ratio."""
    base = summary[PLAIN]
    out: dict = {}
    for name, v in summary.items():
        if name == PLAIN:
            continue

        def diff(key: str, v: dict = v) -> float | None:
            return None if base[key] is None or v[key] is None else v[key] - base[key]

        def ratio(key: str, v: dict = v) -> float | None:
            return v[key] / base[key] if base.get(key) and v.get(key) is not None else None

        out[name] = {
            "ttft_added_p50_ms": diff("ttft_p50_ms"),
            "ttft_added_p99_ms": diff("ttft_p99_ms"),
            "itl_added_p50_ms": diff("itl_p50_ms"),
            "itl_added_p99_ms": diff("itl_p99_ms"),
            "e2e_added_p50_ms": diff("e2e_p50_ms"),
            "e2e_added_p99_ms": diff("e2e_p99_ms"),
            "throughput_ratio": ratio("req_per_s"),
            "throughput_ratio_round_medians": ratio("req_per_s_round_median"),
            "throughput_ratio_best_rounds": ratio("req_per_s_round_best"),
        }
    return out


def front_end_cpu(groups: dict[str, float] | None, name: str) -> dict | None:
    """CPU ms per request of one target's own processes while its rounds ran."""
    if not groups:
        return None
    name = family(name)
    prefix = GROUP_PREFIX[name] + ": "
    own = {k[len(prefix) :]: v for k, v in groups.items() if k.startswith(prefix)}
    front = sum(groups.get(k, 0.0) for k in FRONT_END[name])
    return {
        "front_end_ms": front,
        "ray_system_ms": own.get("ray system", 0.0),
        "engine_core_ms": own.get("engine core", 0.0),
        "postgres_ms": own.get("postgres", 0.0),
        "groups": own,
    }


def tables(results: dict, runtime: dict) -> str:
    present = list(next(iter(results.values()))["summary"])
    names = [n for n in TARGETS if n in present] + [n for n in present if n not in TARGETS]
    lines = [
        "| c | target | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | req/s | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, entry in results.items():
        for name in names:
            v = entry["summary"][name]
            lines.append(
                f"| {level} | {name} | {fmt(v['ttft_p50_ms'])} | {fmt(v['ttft_p99_ms'])} | "
                f"{fmt(v['itl_p50_ms'], 2)} | {fmt(v['itl_p99_ms'], 2)} | {fmt(v['e2e_p50_ms'])} | "
                f"{fmt(v['e2e_p99_ms'])} | {fmt(v['req_per_s'], 2)} | {v['failed']}/{v['requests']} |"
            )
    lines += [
        "",
        "| c | target | TTFT added p50 | TTFT added p99 | ITL added p50 | ITL added p99 | E2E added p50 | "
        "throughput ×plain, all rounds | best rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, entry in results.items():
        for name, d in entry["delta"].items():
            lines.append(
                f"| {level} | {name} | {fmt(d['ttft_added_p50_ms'], sign=True)} | "
                f"{fmt(d['ttft_added_p99_ms'], sign=True)} | "
                f"{fmt(d['itl_added_p50_ms'], 2, True)} | {fmt(d['itl_added_p99_ms'], 2, True)} | "
                f"{fmt(d['e2e_added_p50_ms'], sign=True)} | {fmt(d['throughput_ratio'], 2)} | "
                f"{fmt(d['throughput_ratio_best_rounds'], 2)} |"
            )
    lines += [
        "",
        "| c | target | front-end CPU ms/request | of which | Ray's own processes | engine core |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for level, entry in results.items():
        for name in names:
            cpu = front_end_cpu((entry.get("cpu_ms_per_request") or {}).get(name), name)
            if cpu is None:
                continue
            parts = ", ".join(
                f"{k} {v:.1f}"
                for k, v in cpu["groups"].items()
                if GROUP_PREFIX[family(name)] + ": " + k in FRONT_END[family(name)]
            )
            extra = f" (+ postgres {cpu['postgres_ms']:.1f})" if cpu["postgres_ms"] else ""
            lines.append(
                f"| {level} | {name} | {cpu['front_end_ms']:.1f} | {parts} | "
                f"{cpu['ray_system_ms']:.1f}{extra} | {cpu['engine_core_ms']:.1f} |"
            )
    lines += ["", target_table(results, names, runtime)]
    return "\n".join(lines)


def target_table(results: dict, names: list[str], runtime: dict) -> str:
    """The serving-path issue's table, re-measured: one column per target."""
    heading = {PLAIN: "plain vLLM", RAY_LLM: "Ray Serve LLM `build_openai_app`", OURS: "agencyllm"}
    heading.update({n: n for n in names if n not in heading})
    goal = {
        "ttft": "≤ 3 ms / ≤ 15 ms",
        "tput": "≥ 0.97×, and above Ray Serve LLM",
        "cpu": "≤ 2× plain vLLM",
        "itl": "smooth (report)",
    }
    top = str(max(map(int, results)))
    first = str(min(map(int, results)))

    def cell(name: str, what: str) -> str:
        s1, s32 = results[first]["summary"][name], results[top]["summary"][name]
        d1 = results[first]["delta"].get(name)
        d32 = results[top]["delta"].get(name)
        if what == "ttft":
            return (
                "—"
                if d1 is None
                else f"{fmt(d1['ttft_added_p50_ms'], sign=True)} / {fmt(d1['ttft_added_p99_ms'], sign=True)}"
            )
        if what == "itl1":
            return f"{fmt(s1['itl_p50_ms'], 2)} / {fmt(s1['itl_p99_ms'], 1)}"
        if what == "itl32":
            return f"{fmt(s32['itl_p50_ms'], 2)} / {fmt(s32['itl_p99_ms'], 1)}"
        if what == "e2e":
            return f"{fmt(s1['e2e_p50_ms'])} / {fmt(s1['e2e_p99_ms'])}"
        if what == "rps":
            return " / ".join(fmt(results[c]["summary"][name]["req_per_s"], 1) for c in results)
        if what == "tput":
            if d32 is None:
                return "1.00×"
            return f"{fmt(d32['throughput_ratio'], 2)}× (best rounds {fmt(d32['throughput_ratio_best_rounds'], 2)}×)"
        if what == "cpu":
            cpu = front_end_cpu((results[top].get("cpu_ms_per_request") or {}).get(name), name)
            if cpu is None:
                return "-"
            text = f"{cpu['front_end_ms']:.1f} ms"
            if name != PLAIN:
                text += f" + {cpu['ray_system_ms']:.1f} in Ray's processes"
            return text
        if what == "start":
            return fmt(runtime.get("ready_s", {}).get(name), 0) + " s"
        raise ValueError(what)

    rows = [
        (f"TTFT added at c={first}, p50 / p99 (ms)", "ttft", goal["ttft"]),
        (f"inter-token latency at c={first}, p50 / p99 (ms)", "itl1", goal["itl"]),
        (f"inter-token latency at c={top}, p50 / p99 (ms)", "itl32", goal["itl"]),
        (f"E2E at c={first}, p50 / p99 (ms)", "e2e", ""),
        ("req/s at c=" + "/".join(results), "rps", ""),
        (f"throughput at c={top}", "tput", goal["tput"]),
        (f"front-end CPU per request at c={top}", "cpu", goal["cpu"]),
        ("process start to first answer, this run (all three starting together)", "start", ""),
    ]
    lines = [
        "| measure (same run) | " + " | ".join(heading[n] for n in names) + " | target |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for label, what, target in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n, what) for n in names) + f" | {target} |")
    return "\n".join(lines)

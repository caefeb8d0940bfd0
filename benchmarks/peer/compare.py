"""From raw runs to what the result reports: per-run figures, medians over repeats,
peer / ours ratios, verdicts against the targets, the peer's memory headroom, and the
Markdown table."""

from __future__ import annotations

import statistics
from typing import Any

from .job import KS, MB, METHODS, PEER_README_PSS_SLOPE, RAM_BUDGET_GIB, TARGETS


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def peer_figures(r: dict[str, Any]) -> dict[str, Any]:
    fit_cpu = r.get("round_clients_fit_cpu_s") or []
    server_cpu = r.get("round_server_cpu_s") or []
    cpu = [a + b for a, b in zip(fit_cpu, server_cpu, strict=False)]
    return {
        "ok": r.get("exit_status") == 0,
        "round_s": _median(r.get("round_s") or []),
        "round_fit_s": _median(r.get("round_fit_s") or []),
        "setup_s": r.get("setup_s"),
        "setup_excl_index_s": r.get("setup_excl_store_s"),
        "bytes_per_round": _median(r.get("bytes_per_round") or []),
        "rss_gib": r.get("peak_rss_sum_gib"),
        "pss_gib": r.get("peak_pss_sum_gib"),
        "cpu_per_round_s": _median(cpu),
        "job_cpu_s": r.get("job_cpu_s"),
        "weight_change_l2": r.get("weight_change_l2"),
        "total_s": r.get("total_s"),
    }


def ours_figures(r: dict[str, Any]) -> dict[str, Any]:
    if r.get("exit_status") != 0:
        return {"ok": False}
    rss = max(r["sampled_peak_rss_sum_gib"], r["max_history_peak_rss_gib"])
    return {
        "ok": True,
        "round_s": _median(r["round_seconds"]),
        "round_fit_s": _median(r["round_seconds"]),
        "round_incl_eval_s": _median(r["round_total_seconds"]),
        "setup_s": r["setup_s"],
        "setup_excl_index_s": r.get("setup_excl_index_s"),
        "bytes_per_round": _median(r["bytes_per_round"]),
        "rss_gib": rss,
        "history_rss_gib": r["max_history_peak_rss_gib"],
        "pss_gib": r["sampled_peak_pss_sum_gib"],
        "cpu_per_round_s": _median(r["round_cpu_s"]),
        "job_cpu_s": r["job_cpu_s"],
        "weight_change_l2": r["trained_weight_change_l2"],
        "retriever_weight_change_l2": r["retriever_weight_change_l2"],
        "total_s": r["total_s"],
    }


FIELDS = (
    "round_s",
    "round_fit_s",
    "setup_s",
    "setup_excl_index_s",
    "bytes_per_round",
    "rss_gib",
    "pss_gib",
    "cpu_per_round_s",
    "job_cpu_s",
    "weight_change_l2",
    "retriever_weight_change_l2",
    "history_rss_gib",
    "round_incl_eval_s",
    "total_s",
)


def medians(figs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [f for f in figs if f.get("ok")]
    out: dict[str, Any] = {"runs": len(figs), "runs_ok": len(ok)}
    for field in FIELDS:
        vals = [f.get(field) for f in ok if f.get(field) is not None]
        if vals:
            out[field] = _median(vals)
            out[field + "_range"] = [min(vals), max(vals)]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for method in METHODS:
        for k in KS:
            key = f"{method}-k{k}"
            peer = medians([peer_figures(r) for r in raw.get(f"peer-{key}", [])])
            ours = medians([ours_figures(r) for r in raw.get(f"ours-{key}", [])])
            full = medians([ours_figures(r) for r in raw.get(f"ours-{key}-fullretr", [])])
            ratios = {
                "round_s": _ratio(peer.get("round_s"), ours.get("round_s")),
                "round_fit_s": _ratio(peer.get("round_fit_s"), ours.get("round_fit_s")),
                "memory_rss": _ratio(peer.get("rss_gib"), ours.get("rss_gib")),
                "memory_pss": _ratio(peer.get("pss_gib"), ours.get("pss_gib")),
                "bytes": _ratio(peer.get("bytes_per_round"), ours.get("bytes_per_round")),
                "cpu_per_round": _ratio(peer.get("cpu_per_round_s"), ours.get("cpu_per_round_s")),
                "setup_s": _ratio(peer.get("setup_s"), ours.get("setup_s")),
            }
            if full.get("runs_ok"):
                ratios["bytes_vs_full_query_encoder"] = _ratio(
                    peer.get("bytes_per_round"), full.get("bytes_per_round")
                )
            cells[key] = {"peer": peer, "ours": ours, "ratios_peer_over_ours": ratios}
            if full.get("runs"):
                cells[key]["ours_full_query_encoder"] = full
    return cells


def verdicts(cells: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def verdict(name: str, target: float, keys: list[str], field: str) -> None:
        vals = {k: cells[k]["ratios_peer_over_ours"].get(field) for k in keys if k in cells}
        got = [v for v in vals.values() if v is not None]
        out[name] = {
            "target": f">= {target}x (peer / ours)",
            "ratios": vals,
            "min": min(got) if got else None,
            "met": bool(got) and len(got) == len(vals) and min(got) >= target,
        }

    at_k4 = [f"{m}-k4" for m in METHODS]
    verdict("per_round_time_3x_at_k4", TARGETS["round_s"], at_k4, "round_s")
    verdict("memory_4x_at_k4", TARGETS["memory_k4"], at_k4, "memory_rss")
    verdict("memory_4x_at_k4_pss", TARGETS["memory_k4"], at_k4, "memory_pss")
    verdict("bytes_50x_at_k4", TARGETS["bytes"], at_k4, "bytes")
    return out


def peer_headroom(cells: dict[str, Any]) -> dict[str, Any]:
    """Largest K the peer fits in RAM_BUDGET_GIB, from its PSS at K=2 and 4 (this run) and
    from the slope measured in benchmarks/peer/README.md."""
    out = {}
    for method in METHODS:
        p2 = cells.get(f"{method}-k2", {}).get("peer", {}).get("pss_gib")
        p4 = cells.get(f"{method}-k4", {}).get("peer", {}).get("pss_gib")
        entry: dict[str, Any] = {}
        if p2 and p4:
            slope = (p4 - p2) / 2
            fixed = p2 - 2 * slope
            entry["this_run"] = {
                "pss_per_client_gib": slope,
                "pss_fixed_gib": fixed,
                "pss_k16_gib": fixed + 16 * slope,
                "pss_k64_gib": fixed + 64 * slope,
                "max_k_under_budget": int((RAM_BUDGET_GIB - fixed) // slope) if slope > 0 else None,
            }
        s, f = PEER_README_PSS_SLOPE[method]
        entry["peer_readme"] = {
            "pss_per_client_gib": s,
            "pss_fixed_gib": f,
            "pss_k16_gib": f + 16 * s,
            "pss_k64_gib": f + 64 * s,
            "max_k_under_budget": int((RAM_BUDGET_GIB - f) // s),
        }
        out[method] = entry
    return out


def memory_crossover(cells: dict[str, Any], scale: list[dict[str, Any]]) -> dict[str, Any]:
    """Smallest K where peer RSS / ours RSS >= the memory target: the peer's summed RSS
    extrapolated linearly from its K=2 and 4 medians; ours taken as the largest summed RSS
    measured at any K for that method (it is flat in K: same 2 actors at K=2 ... 64)."""
    out = {}
    for method in METHODS:
        p2 = cells.get(f"{method}-k2", {}).get("peer", {}).get("rss_gib")
        p4 = cells.get(f"{method}-k4", {}).get("peer", {}).get("rss_gib")
        ours = [cells.get(f"{method}-k{k}", {}).get("ours", {}).get("rss_gib") for k in KS]
        ours += [ours_figures(r).get("rss_gib") for r in scale if r.get("method") == method]
        ours = [v for v in ours if v]
        if not (p2 and p4 and ours):
            continue
        slope = (p4 - p2) / 2
        fixed = p2 - 2 * slope
        worst = max(ours)
        k_met = next(
            (k for k in range(2, 1000) if (fixed + slope * k) / worst >= TARGETS["memory_k4"]),
            None,
        )
        out[method] = {
            "peer_rss_per_client_gib": slope,
            "peer_rss_fixed_gib": fixed,
            "ours_rss_max_over_all_k_gib": worst,
            "ours_rss_by_k_gib": {str(k): v for k, v in zip(KS, ours, strict=False)},
            "smallest_k_with_ratio_ge_target": k_met,
        }
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def table(cells: dict[str, Any], scale: list[dict[str, Any]]) -> str:
    head = (
        "| job | system | round s | setup s | MB / round | peak RSS sum GiB "
        "| peak PSS sum GiB | CPU s / round | trained-weights change L2 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, cell in cells.items():
        method, k = key.split("-k")
        rows = [("fed-rag 0.0.27", cell["peer"]), ("fedrag_ray (LoRA)", cell["ours"])]
        if "ours_full_query_encoder" in cell:
            rows.append(("fedrag_ray (full query enc., 1 run)", cell["ours_full_query_encoder"]))
        for label, m in rows:
            lines.append(
                f"| {method.upper()} K={k} | {label} | {_fmt(m.get('round_s'))} "
                f"| {_fmt(m.get('setup_s'), 0)} | {_fmt(_mb(m.get('bytes_per_round')), 2)} "
                f"| {_fmt(m.get('rss_gib'), 2)} | {_fmt(m.get('pss_gib'), 2)} "
                f"| {_fmt(m.get('cpu_per_round_s'))} | {_fmt(m.get('weight_change_l2'), 3)} |"
            )
        r = cell["ratios_peer_over_ours"]
        lines.append(
            f"| {method.upper()} K={k} | **peer / ours** | **{_fmt(r['round_s'])}×** "
            f"| {_fmt(r['setup_s'])}× | **{_fmt(r['bytes'], 0)}×** "
            f"| **{_fmt(r['memory_rss'])}×** | {_fmt(r['memory_pss'])}× "
            f"| {_fmt(r['cpu_per_round'])}× | |"
        )
    if scale:
        lines += [
            "",
            "| ours alone (128 questions) | round s (median) | setup s | MB / round "
            "| peak RSS sum GiB | peak PSS sum GiB | CPU s / round |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in scale:
            f = ours_figures(r)
            lines.append(
                f"| {r.get('method', '?').upper()} K={r.get('clients')} "
                + (
                    f"| {_fmt(f['round_s'])} | {_fmt(f['setup_s'], 0)} "
                    f"| {_fmt(_mb(f['bytes_per_round']), 2)} | {_fmt(f['rss_gib'], 2)} "
                    f"| {_fmt(f['pss_gib'], 2)} | {_fmt(f['cpu_per_round_s'])} |"
                    if f["ok"]
                    else "| failed | | | | | |"
                )
            )
    return "\n".join(lines)


def _mb(v: float | None) -> float | None:
    return None if v is None else v / MB


def derive(
    raw: dict[str, list[dict[str, Any]]], scale_runs: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """Everything computed from the raw runs: medians, verdicts, headroom, table."""
    cells = summarize(raw)
    verdict = verdicts(cells)
    crossover = memory_crossover(cells, scale_runs)
    verdict["memory_4x_at_k4"]["extrapolated_smallest_k_met"] = {
        m: c["smallest_k_with_ratio_ge_target"] for m, c in crossover.items()
    }
    return cells, verdict, peer_headroom(cells), crossover, table(cells, scale_runs)

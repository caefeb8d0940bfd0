"""Summarize run_peer.py result JSONs as a Markdown table (median over repeats).

    python benchmarks/peer/summarize.py benchmarks/peer/results/*.json

Standard library only; runs in any Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

GIB = 1024**3
MB = 1e6


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(paths: list[Path]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        run = json.loads(path.read_text())
        key = (run["method"], run["clients"], run.get("strategy", "?"))
        groups[key].append(run)
    header = (
        "| method | K | strategy | runs ok | setup s (excl. store) | round s (median) "
        "| comm share | client fit CPU s/round | MB/round | peak RSS GiB | peak PSS GiB "
        "| per-client RSS GiB | weight change L2 | train loss reported / actual |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (method, k, strategy), runs in sorted(groups.items()):
        ok = [r for r in runs if r.get("exit_status") == 0]
        use = ok or runs
        rounds = [_median(r.get("round_s") or []) for r in use]
        comm = [_median(r.get("round_comm_share") or []) for r in use]
        cpu = [_median(r.get("round_clients_fit_cpu_s") or []) for r in use]
        mb = [_median(r.get("bytes_per_round") or []) for r in use]
        per_client = [
            _median([v for n, v in r.get("peak_rss_by_process_gib", {}).items() if "client" in n])
            for r in use
        ]
        setup = _median([r.get("setup_s") for r in use])
        setup_x = _median([r.get("setup_excl_store_s") for r in use])
        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    str(k),
                    strategy,
                    f"{len(ok)}/{len(runs)}",
                    f"{_fmt(setup)} ({_fmt(setup_x)})",
                    _fmt(_median(rounds)),
                    _fmt(_median(comm), 2),
                    _fmt(_median(cpu)),
                    _fmt((_median(mb) or 0) / MB, 0),
                    _fmt(_median([r.get("peak_rss_sum_gib") for r in use]), 2),
                    _fmt(_median([r.get("peak_pss_sum_gib") for r in use]), 2),
                    _fmt(_median(per_client), 2),
                    _fmt(_median([r.get("weight_change_l2") for r in use]), 4),
                    f"{_fmt(_median([r.get('train_loss_reported') for r in use]), 3)} / "
                    f"{_fmt(_median([r.get('train_loss_actual') for r in use]), 4)}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    print(summarize(parser.parse_args().paths))


if __name__ == "__main__":
    main()

"""Turn a pytest-benchmark JSON file into a Markdown table of speed-ups and a PNG chart.

    pytest benchmarks --benchmark-only --benchmark-json results.json
    python -m benchmarks.report results.json [--markdown out.md] [--chart out.png]

Benchmarks are grouped by their pytest-benchmark group (one group = one problem size on one
device); within a group the baseline is the path whose `extra_info["path"]` starts with
"official" or "per-parameter loop" (else the slowest), and every row's speed-up is
baseline median / row median.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

BASELINE_PREFIXES = ("official", "per-parameter loop", "eager (not compiled)")


def load_rows(path: str | Path) -> tuple[dict, list[dict]]:
    """Read a --benchmark-json file; return (machine_info, rows), one row per benchmark."""
    data = json.loads(Path(path).read_text())
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        stats = bench["stats"]
        rows.append({
            "group": bench.get("group") or bench["name"],
            "name": bench["name"],
            "path": info.get("path", bench["name"]),
            "device": info.get("device", ""),
            "median_ms": stats["median"] * 1e3,
            "min_ms": stats["min"] * 1e3,
            "rounds": stats["rounds"],
            "gbps": info.get("GB/s"),
            "pct_roofline": info.get("pct_of_roofline"),
            "peak_mb": info.get("peak_memory_MB", info.get("peak_rss_growth_MB")),
        })
    return data.get("machine_info", {}), rows


def group_rows(rows: list[dict]) -> OrderedDict[str, list[dict]]:
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for members in groups.values():
        base = next((r for r in members if r["path"].lower().startswith(BASELINE_PREFIXES)),
                    max(members, key=lambda r: r["median_ms"]))
        for r in members:
            r["speedup"] = base["median_ms"] / r["median_ms"]
            r["baseline"] = r is base
    return groups


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(machine: dict, groups: OrderedDict[str, list[dict]]) -> str:
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    lines = [f"Machine: {machine.get('node', '?')}, {cpu}".rstrip(", "), ""]
    for group, members in groups.items():
        devices = sorted({r["device"] for r in members if r["device"]})
        lines += [f"### {group}" + (f" — {', '.join(devices)}" if devices else ""), "",
                  "| path | median ms | min ms | speed-up | GB/s | % roofline | peak MB* |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in members:
            tag = " (baseline)" if r["baseline"] else ""
            lines.append(f"| {r['path']}{tag} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                         f"{r['speedup']:.2f}x | {_fmt(r['gbps'], '.1f')} | "
                         f"{_fmt(r['pct_roofline'], '.1f')} | {_fmt(r['peak_mb'], '.1f')} |")
        lines.append("")
    lines.append("*peak MB: extra device memory of one call on CUDA; on CPU the growth of the "
                 "resident set, a lower bound (reused heap blocks are not seen).")
    return "\n".join(lines)


def chart(groups: OrderedDict[str, list[dict]], out: str | Path) -> None:
    """One horizontal bar panel per group: speed-up over that group's baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    total = sum(len(members) for members in groups.values())
    fig, axes = plt.subplots(n, 1, figsize=(8, 0.6 + 0.35 * total + 0.7 * n), squeeze=False)
    for ax, (group, members) in zip(axes[:, 0], groups.items()):
        labels = [r["path"] for r in members]
        ax.barh(labels, [r["speedup"] for r in members],
                color=["#999999" if r["baseline"] else "#2a7ab9" for r in members])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("speed-up over baseline (x)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("--markdown", help="write the Markdown table here (default: stdout)")
    parser.add_argument("--chart", help="write a PNG chart of the speed-ups here")
    args = parser.parse_args(argv)
    machine, rows = load_rows(args.json)
    if not rows:
        print(f"{args.json}: no benchmark ran", file=sys.stderr)
        return 1
    groups = group_rows(rows)
    text = markdown(machine, groups)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    else:
        print(text)
    if args.chart:
        chart(groups, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())

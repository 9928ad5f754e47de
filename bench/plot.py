"""Plot of the chain benchmark: delivered msg/s against sessions, per system and message size.

    python -m bench.plot RESULTS.json [OUT.png]

One line per (system, size): colour by size, solid for smarthost, dashed for Postfix;
the point is the median of the runs, the bar spans min to max.  Log scale on both
axes (1 MB and 5 KB rates differ by an order of magnitude).  Needs matplotlib.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LABEL = {"5k": "5 KB", "50k": "50 KB", "1m": "1 MB"}
COLOUR = {"5k": "tab:blue", "50k": "tab:orange", "1m": "tab:green"}
STYLE = {"smarthost": ("-", "o"), "postfix": ("--", "s")}


def plot(results: dict, path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
    for point in results["chain"]:
        for system, data in point["systems"].items():
            d = data.get("summary", {}).get("delivered_per_s", {})
            if d.get("median") is None:
                continue
            series.setdefault((system, point["size"]), []).append(
                (point["sessions"], d["median"], d["min"], d["max"]))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for (system, size), pts in sorted(series.items(), key=lambda kv: (list(LABEL).index(kv[0][1]), kv[0][0])):
        pts.sort()
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        line, marker = STYLE.get(system, (":", "^"))
        ax.errorbar(x, y, yerr=err, linestyle=line, marker=marker, color=COLOUR.get(size), capsize=3,
                    label=f"{system}, {LABEL.get(size, size)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sessions = sorted({p["sessions"] for p in results["chain"]})
    ax.set_xticks(sessions)
    ax.set_xticklabels([str(s) for s in sessions])
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(some)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("concurrent SMTP sessions")
    ax.set_ylabel("delivered msg/s (to Maildir, median of runs)")
    host = results.get("meta", {}).get("host", {})
    ax.set_title(f"edge -> filter -> domain -> Maildir on 127.0.0.1 ({host.get('cpus', '?')} CPUs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    out = argv[1] if len(argv) > 1 else str(Path(argv[0]).with_name("delivered.png"))
    print(plot(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

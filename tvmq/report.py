"""Side-by-side layer comparison and the self-contained HTML report of a profile."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from .profiler import Profile


@dataclass(frozen=True)
class LayerPair:
    """The kernels of two builds that compute the same ONNX nodes."""

    nodes: tuple[str, ...]
    kernels: tuple[str, ...]
    baseline_kernels: tuple[str, ...]
    time_ms: float
    baseline_ms: float

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.time_ms if self.time_ms else float("inf")


def pair_layers(profile: Profile, baseline: Profile) -> list[LayerPair]:
    """Group the kernels of both profiles that share an ONNX node into one layer each.

    Fusion differs between builds (an INT8 layer has its requantize fused, an FP32 one its
    batch norm), so a layer is a connected group of kernels linked by shared node names.
    """
    parent: dict[tuple[int, str], tuple[int, str]] = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    owner: dict[str, tuple[int, str]] = {}
    for side, prof in enumerate((profile, baseline)):
        for row in prof.rows:
            key = (side, row.name)
            find(key)
            # A row that covers no ONNX node (the VM runtime row) pairs with its namesake.
            for node in row.nodes or (f"#{row.name}",):
                if node in owner:
                    parent[find(key)] = find(owner[node])
                else:
                    owner[node] = key
    groups: dict[tuple[int, str], list[tuple[int, object]]] = {}
    for side, prof in enumerate((profile, baseline)):
        for row in prof.rows:
            groups.setdefault(find((side, row.name)), []).append((side, row))
    pairs = []
    for members in groups.values():
        nodes = tuple(dict.fromkeys(n for _, row in members for n in row.nodes))
        nodes = nodes or (members[0][1].name,)
        pairs.append(
            LayerPair(
                nodes=nodes,
                kernels=tuple(row.name for side, row in members if side == 0),
                baseline_kernels=tuple(row.name for side, row in members if side == 1),
                time_ms=sum(row.time_ms for side, row in members if side == 0),
                baseline_ms=sum(row.time_ms for side, row in members if side == 1),
            )
        )
    return sorted(pairs, key=lambda p: -max(p.time_ms, p.baseline_ms))


def comparison_table(profile: Profile, baseline: Profile) -> str:
    lines = [
        f"{profile.artifact} vs baseline {baseline.artifact}",
        f"{'layer (ONNX nodes)':<44} {'ms':>9} {'base ms':>9} {'speedup':>8}",
    ]
    for pair in pair_layers(profile, baseline):
        label = ", ".join(pair.nodes[:2]) or ", ".join(pair.kernels + pair.baseline_kernels)
        speedup = f"{pair.speedup:.2f}x" if pair.time_ms and pair.baseline_ms else "-"
        lines.append(f"{label[:44]:<44} {pair.time_ms:>9.4f} {pair.baseline_ms:>9.4f} {speedup:>8}")
    total = baseline.end_to_end_ms / profile.end_to_end_ms
    lines.append(
        f"end to end: {profile.end_to_end_ms:.4f} ms vs {baseline.end_to_end_ms:.4f} ms "
        f"({total:.2f}x)"
    )
    return "\n".join(lines)


def html_report(profile: Profile, baselines=(), accuracy: dict[str, float] | None = None) -> str:
    """One standalone HTML file: tables and plots (PNG embedded as data URIs)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>tvmq profile: {html.escape(profile.artifact)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td.l,th.l{text-align:left}</style></head><body>",
        f"<h1>tvmq profile</h1><p id='summary'>{html.escape(profile.artifact)} on target "
        f"{html.escape(profile.target)}: end to end {profile.end_to_end_ms:.4f} ms, sum of "
        f"kernels {profile.kernels_ms:.4f} ms ({profile.difference * 100:+.1f}%).</p>",
        f"<img id='time-per-kernel' alt='time per kernel' src='{_bar_chart(profile)}'>",
        _kernel_table(profile),
    ]
    for baseline in baselines:
        parts.append(f"<h2>Against {html.escape(baseline.artifact)}</h2>")
        parts.append(_comparison_html(profile, baseline))
    if baselines:
        parts.append("<h2>Trade-off</h2>")
        parts.append(
            f"<img id='trade-off' alt='trade-off' "
            f"src='{_tradeoff_chart([profile, *baselines], accuracy or {})}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _kernel_table(profile: Profile) -> str:
    head = ("kernel", "calls", "ms", "share", "GOP/s", "% peak", "precision", "algorithm",
            "schedule", "nodes")
    rows = ["<table id='kernels'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in profile.rows:
        cells = [
            f"<td class='l'>{html.escape(r.name)}</td>", f"<td>{r.calls}</td>",
            f"<td>{r.time_ms:.4f}</td>", f"<td>{r.share * 100:.1f}%</td>",
            f"<td>{r.throughput_gops:.2f}</td>", f"<td>{r.peak_fraction * 100:.1f}%</td>",
            f"<td>{r.precision}</td>", f"<td>{r.algorithm}</td>",
            f"<td>{r.schedule}</td>", f"<td class='l'>{html.escape(', '.join(r.nodes))}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join([*rows, "</table>"])


def _comparison_html(profile: Profile, baseline: Profile) -> str:
    rows = ["<table class='comparison'><tr><th class='l'>layer</th><th>ms</th>"
            "<th>baseline ms</th><th>speedup</th></tr>"]
    for pair in pair_layers(profile, baseline):
        label = ", ".join(pair.nodes) or ", ".join(pair.kernels + pair.baseline_kernels)
        speedup = f"{pair.speedup:.2f}x" if pair.time_ms and pair.baseline_ms else "-"
        rows.append(
            f"<tr><td class='l'>{html.escape(label)}</td><td>{pair.time_ms:.4f}</td>"
            f"<td>{pair.baseline_ms:.4f}</td><td>{speedup}</td></tr>"
        )
    return "\n".join([*rows, "</table>"])


def _figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bar_chart(profile: Profile) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = profile.rows[:30]
    figure, axes = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.2))
    axes.barh([r.name[:48] for r in rows][::-1], [r.time_ms for r in rows][::-1])
    axes.set_xlabel("time per run (ms)")
    axes.set_title("time per kernel")
    return _figure_uri(figure)


def _tradeoff_chart(profiles, accuracy: dict[str, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for prof in profiles:
        axes.scatter(prof.size_bytes / 1e6, prof.end_to_end_ms, s=60)
        label = prof.artifact.rsplit("/", 1)[-1]
        if prof.artifact in accuracy:
            label += f" ({accuracy[prof.artifact] * 100:.1f}%)"
        axes.annotate(label, (prof.size_bytes / 1e6, prof.end_to_end_ms))
    axes.set_xlabel("artifact size (MB)")
    axes.set_ylabel("latency (ms)")
    axes.set_title("latency / size trade-off (top-1 in brackets)")
    return _figure_uri(figure)

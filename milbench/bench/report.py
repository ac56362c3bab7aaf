"""The benchmark's report: one line per record while it runs, and the markdown tables of docs/performance.md."""

from __future__ import annotations

from typing import Any

from milbench.bench.bags import ANCHOR_H100


def one_line(record: dict[str, Any]) -> str:
    """A progress line for one record."""
    head = f"{record.get('model')} {record.get('bag', '')}"
    if "error" in record or "skipped" in record:
        return f"{head}: {record.get('error') or record.get('skipped')}"
    if "speedup" in record:
        return (f"{head}: {record['single_bags_per_s']:.1f} bags/s one per step, {record['packed_bags_per_s']:.1f} "
                f"packed by {record['pack']} ({record['speedup']:.1f}x)")
    if "step_ms" in record:
        return (f"{head}: {record['step_ms']:.2f} ms per step, peak {_gib(record['peak_bytes'])} GiB "
                f"({record['peak_kind']})")
    return head


def _graph_cell(stats: dict[str, Any] | None) -> str:
    """'replayed' when the timed steps replayed a graph, 'off' without graphs, else why not."""
    if not stats:
        return "off"
    return f"off: {stats['off']}" if stats.get("off") else ("replayed" if stats["replayed"] else "not replayed")


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """Markdown tables of benchmark records: step times (beside the H100 anchor where it applies), packed
    throughput, end-to-end epochs, and one line per failed or skipped measurement."""
    lines: list[str] = []
    steps = [r for r in records if "step_ms" in r]
    if steps:
        lines += ["| model | bag (5x/10x/20x) | device | dtype | compile | CUDA graph | step ms (median) | peak GiB "
                  "| anchor fp16 ms | anchor fp16 GiB | speed-up |", "|" + "---|" * 11]
        for r in steps:
            anchor = ANCHOR_H100.get((r["model"], r["bag"])) if r["device"].startswith("cuda") else None
            speed = f"{anchor[0] / r['step_ms']:.1f}x" if anchor and r["in_dim"] == 2048 else "-"
            peak = _gib(r["peak_bytes"]) if r["peak_kind"] == "cuda_max_allocated" else \
                f"{_gib(r['peak_bytes'])} ({r['peak_kind']})"
            lines.append(f"| {r['model']} | {r['bag']} ({r['n5']}/{r['n10']}/{r['n20']}) | {r['device_name']} | "
                         f"{r['dtype']} | {r['compile']} | {_graph_cell(r.get('cuda_graphs'))} | "
                         f"{r['step_ms']:.2f} | {peak} | "
                         f"{anchor[0] if anchor else '-'} | {anchor[1] if anchor else '-'} | {speed} |")
        lines.append("")
    packed = [r for r in records if "speedup" in r]
    if packed:
        lines += ["| model | bag | device | pack | one bag per step (bags/s) | packed (bags/s) | speed-up "
                  "| anchor one-bag fp16 (bags/s) | packed vs anchor | peak GiB single / packed |",
                  "|" + "---|" * 10]
        for r in packed:
            anchor = ANCHOR_H100.get((r["model"], r["bag"])) if r["device"].startswith("cuda") else None
            rate, ratio = "-", "-"
            if anchor and r["in_dim"] == 2048:  # the anchor's one-bag step, forward + backward only
                rate, ratio = f"{1000 / anchor[0]:.0f}", f"{r['packed_bags_per_s'] * anchor[0] / 1000:.1f}x"
            lines.append(f"| {r['model']} | {r['bag']} | {r['device_name']} | {r['pack']} | "
                         f"{r['single_bags_per_s']:.1f} | {r['packed_bags_per_s']:.1f} | {r['speedup']:.1f}x | "
                         f"{rate} | {ratio} | {_gib(r['single_peak_bytes'])} / {_gib(r['packed_peak_bytes'])} |")
        lines.append("")
    profiled = [r for r in records if "host_issue_ms" in r]
    if profiled:
        lines += ["| model | bag | compile | attention kernel preferred | step ms | host issue ms | device busy ms "
                  "| kernels | aten ops |", "|" + "---|" * 9]
        for r in profiled:
            busy = "-" if r["device_busy_ms"] is None else f"{r['device_busy_ms']:.2f}"
            lines.append(f"| {r['model']} | {r['bag']} | {r['compile']} | {r.get('sdpa', 'default')} | "
                         f"{r['step_ms']:.2f} | {r['host_issue_ms']:.2f} | {busy} | {r['kernels']} | "
                         f"{r['aten_ops']} |")
        lines.append("")
        for r in profiled:
            lines += [f"{r['model']} {r['bag']}, compile {r['compile']}, attention {r.get('sdpa', 'default')}:", "",
                      "```", r["top_device"], r["top_host"], "```", ""]
    for r in (r for r in records if r.get("kind") == "epoch" and "milbench_cached" in r):
        ref, disk, cached = r["reference"], r["milbench_disk"], r["milbench_cached"]
        lines += [f"End to end, {r['model']} at {r['bag']} bags, width {r['in_dim']}, {r['device_name']} "
                  f"(page cache {r['page_cache']}):", "",
                  "| path | slides | seconds | slides per second |", "|---|---|---|---|",
                  f"| reference: per-slide .pt files each step ({r['workers']} workers), {ref['model']} | "
                  f"{ref['slides']} | {ref['seconds']:.1f} | {ref['slides_per_s']:.1f} |",
                  f"| milbench, first epoch (reads disk into the cache) | {disk['slides']} | "
                  f"{disk['first_epoch_s']:.1f} "
                  f"| {disk['first_slides_per_s']:.1f} |",
                  f"| milbench, second epoch (cached) | {disk['slides']} | {disk['second_epoch_s']:.1f} | "
                  f"{disk['second_slides_per_s']:.1f} |",
                  f"| milbench, first epoch of {cached['patients']} cached patients ({cached['bags_on_device']} on "
                  f"the GPU{'; records the CUDA graphs' if r.get('cuda_graphs') else ''}) | {cached['patients']} | "
                  f"{cached['first_epoch_s']:.1f} | {cached['first_slides_per_s']:.1f} |",
                  f"| milbench, next epoch of the same patients"
                  f"{' (replays the graphs)' if r.get('cuda_graphs') else ''} | {cached['patients']} | {cached['seconds']:.1f} | {cached['slides_per_s']:.1f} |", "",
                  f"Steady-state speed-up {r['speedup_steady']:.1f}x; over 100 epochs (one read, 99 cached) "
                  f"{r['speedup_100_epochs']:.1f}x.", ""]
    for r in records:
        if "error" in r or "compile_error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped") or f"compile failed, eager measured: {r['compile_error']}"
            lines.append(f"- {r.get('model')} {r.get('bag', '')}: {why}")
    return "\n".join(lines) + "\n"

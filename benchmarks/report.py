"""Rebuild benchmarks/README.md (the latest table) and its plot from pytest-benchmark JSON files.

    python -m benchmarks.report [results/FILE.json ...]   # default: the newest JSON per (device, size)

Each row: median and spread (IQR) of the timed rounds, the ratio to the group's baseline measured in
the same run (diffusers for pipeline groups, torch's unfused path for kernel groups), and — for denoising steps — the multiple of the floor (counted FLOPs at the measured matmul
rate of the row's dtype), and for whole generations the images' PSNR against diffusers' fp32 images, and
each row's peak RSS (the process's, from the row's setup to the end of its timed call).
Nothing here measures anything; it only lays out what the JSON holds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PAGE = HERE / "README.md"
PLOT = RESULTS / "step_time.png"
BASELINES = ("diffusers", "torch_unfused")  # what each group's ratio is taken against
MARK_BEGIN, MARK_END = "<!-- results:begin -->", "<!-- results:end -->"


def latest_files() -> list[Path]:
    newest: dict[str, Path] = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.startswith("serve-"):  # bench_serve's own format, tabled by hand in the README
            continue
        key = "-".join(path.stem.split("-")[:2])  # e.g. cpu-sd15, gpu-sd15
        newest[key] = path
    return list(newest.values())


def rows(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    out = []
    for bench in data["benchmarks"]:
        stats, info = bench["stats"], bench.get("extra_info", {})
        backend = info.get("backend") or (bench.get("params") or {}).get("impl", "?")
        out.append(dict(group=bench.get("group") or "", name=bench["name"], backend=backend,
                        median=stats["median"], iqr=stats["iqr"], rounds=stats["rounds"], info=info))
    for r in out:
        base = next((b for b in out if b["group"] == r["group"] and b["backend"] in BASELINES), None)
        r["vs_baseline"] = base["median"] / r["median"] if base else None
    # Each group's rows together, groups in the order they first ran (bench_pipeline runs a backend's step
    # and generate rows one after the other).
    first = {}
    for r in out:
        first.setdefault(r["group"], len(first))
    return data, sorted(out, key=lambda r: first[r["group"]])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def table(path: Path) -> str:
    data, rs = rows(path)
    machine = data.get("machine_info", {})
    # The run's settings, from a fp32 pipeline row (kernel rows carry fewer).
    first = next((r["info"] for r in rs if "matmul_gflops" in r["info"] and not r["backend"].endswith("-bf16")), {})
    lines = [
        f"### {path.name}",
        "",
        f"{data.get('datetime', '?')} · {first.get('cpu') or machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))} · "
        f"torch {first.get('torch', '?')}, {first.get('threads', '?')} threads · "
        f"matmul {first.get('matmul_gflops', 0):.0f} GFLOP/s measured in the run" + _bf16_rate(rs),
        "",
        "| group | backend | median ms | IQR ms | rounds | x faster than baseline | x floor | first call s | PSNR vs diffusers fp32 "
        "| peak RSS GB (+ over its start) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rs:
        ratio = f"{r['vs_baseline']:.2f}" if r["vs_baseline"] else "–"
        floor = f"{r['info']['x_floor']:.2f}" if "x_floor" in r["info"] else "–"
        first_call = f"{r['info']['first_call_s']:.1f}" if "first_call_s" in r["info"] else "–"  # compilation
        peak = _peak(r["info"])
        lines.append(f"| {r['group']} | {r['backend']} | {_ms(r['median'])} | {_ms(r['iqr'])} | {r['rounds']} | "
                     f"{ratio} | {floor} | {first_call} | {_psnr(r['info'])} | {peak} |")
    build = next((r["info"]["engine_build"] for r in rs if "engine_build" in r["info"]), None)
    if build:
        parts = ", ".join(f"{name} {a['bytes'] / 2**20:,.1f} MiB ({a['build_s']:.0f} s)"
                          for name, a in build["artefacts"].items())
        peak = f", peak RSS {build['peak_rss_gb']:.1f} GB in its own process" if "peak_rss_gb" in build else ""
        lines += ["", f"Engine dir (ONNX graphs, run by onnxruntime and openvino) built in {build['seconds']:.0f} s "
                      f"(export, clean-up, save{peak}): {parts}."]
    peaks = [r["info"]["peak_rss_gb"] for r in rs if r["info"].get("peak_rss_gb") is not None]
    if peaks:
        lines += ["", f"Peak RSS of the benchmark process over all rows: {max(peaks):.1f} GB."]
    return "\n".join(lines)


def _bf16_rate(rs: list[dict]) -> str:
    bf16 = next((r for r in rs if r["backend"].endswith("-bf16") and "matmul_gflops" in r["info"]), None)
    return f" (bf16: {bf16['info']['matmul_gflops']:.0f}, the floor of the -bf16 rows)" if bf16 else ""


def _peak(info: dict) -> str:
    """The row's peak RSS, and what it added over the memory it started from (what earlier rows left)."""
    peak, start = info.get("peak_rss_gb"), info.get("start_rss_gb")
    if peak is None:
        return "–"
    return f"{peak:.1f}" + (f" (+{peak - start:.1f})" if start is not None else "")


def _psnr(info: dict) -> str:
    if "max_abs" not in info:  # not a generate row, or an older result file
        return "–"
    if info["psnr_db"] is None:
        return "identical"
    return f"{info['psnr_db']:.1f} dB (max abs {info['max_abs']:.1e})"


def plot(paths: list[Path]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    bars = []
    for path in paths:
        _, rs = rows(path)
        run = "-".join(path.stem.split("-")[:2])  # e.g. cpu-sd15
        bars += [(f"{r['backend']}\n{run}", r["median"] * 1e3) for r in rs if r["info"].get("kind") == "step"]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(bars)), 4.2))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color="#4477aa")
    ax.tick_params(axis="x", labelsize=8, labelrotation=45)
    ax.set_ylabel("ms per denoising step (batch 2)")
    ax.set_title("Time per step by backend")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)
    return PLOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rebuild benchmarks/README.md from result JSON")
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    paths = args.files or latest_files()
    if not paths:
        raise SystemExit(f"no result JSON under {RESULTS}: run `pytest benchmarks/ --benchmark` first")
    body = "\n\n".join(table(p) for p in paths)
    image = plot(paths)
    if image is not None:
        body += f"\n\n![time per step]({image.relative_to(HERE)})"
    page = PAGE.read_text()
    start, end = page.index(MARK_BEGIN) + len(MARK_BEGIN), page.index(MARK_END)
    PAGE.write_text(page[:start] + "\n" + body + "\n" + page[end:])
    print(f"wrote {PAGE}" + (f" and {image}" if image else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

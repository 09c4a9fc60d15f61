"""The table of every Triton kernel variant compiled for every NVIDIA target (benchmarks/triton_targets.py).

    python -m benchmarks.kernel_resources            # compile all (~3.5 h of CPU) -> results/kernel-resources.{json,md}
    python -m benchmarks.kernel_resources --rewrite  # rebuild the .md table and the README summary from the .json

Writes benchmarks/results/kernel-resources.json (a row per kernel, config and target: registers, spill bytes,
shared memory, compile seconds, or the compile error), results/kernel-resources.md (the same as one table per
kernel, a column per target) and the per-kernel summary in benchmarks/README.md. Exits 1 when a variant
fails to compile, breaks a limit not in KNOWN_PROBLEMS, or a known problem is no longer seen.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import triton_targets as tt
from benchmarks.triton_targets import KNOWN_PROBLEMS, REPO, RESULTS_JSON, TARGETS, Compiled, known_problem, limit_problems

RESULTS_MD = REPO / "benchmarks" / "results" / "kernel-resources.md"


def _compile_indices(name: str, indices: list[int]) -> list[dict]:
    """Worker: compile some of one target's variants."""
    return [tt.compile_row(tt.target_variants(name)[i]) for i in indices]


def run_all(workers: int) -> list[dict]:
    """Every variant on every target, compiled in `workers` processes (each rebuilds the variant lists)."""
    jobs = [(t.name, list(range(i, len(tt.target_variants(t.name)), 8))) for t in TARGETS for i in range(8)]
    rows = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done, part in enumerate(pool.map(_compile_indices, *zip(*jobs))):
            rows += part
            print(f"{done + 1}/{len(jobs)} batches, {len(rows)} variants", file=sys.stderr, flush=True)
    order = {t.name: i for i, t in enumerate(TARGETS)}
    return sorted(rows, key=lambda r: (r["kernel"], r["config"], order[r["target"]]))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _cell(row: dict) -> str:
    if "error" in row:
        return "**does not compile**"
    text = f"{row['regs']} · {row['spills']} · {row['smem'] // 1024}"
    problems = limit_problems(Compiled(**row))
    if problems:
        text += " (known)" if all(known_problem(p, row["config"]) for p in problems) else " **over**"
    return text


def markdown_table(rows: list[dict]) -> str:
    """One table per kernel: a row per config, a column per target, cells 'registers · spill bytes · shared KB'."""
    lines = []
    for kernel in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == kernel]
        lines += [f"### {kernel}", "", "| config | " + " | ".join(t.name for t in TARGETS) + " |",
                  "|---|" + "---:|" * len(TARGETS)]
        for config in sorted({r["config"] for r in mine}, key=lambda c: [r["config"] for r in mine].index(c)):
            cells = {r["target"]: _cell(r) for r in mine if r["config"] == config}
            lines.append(f"| {config} | " + " | ".join(cells.get(t.name, "–") for t in TARGETS) + " |")
        lines.append("")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """Per kernel and target: variants, most registers, variants that spill, most shared memory."""
    lines = ["| kernel | target | variants | max registers | spilling (max bytes) | max shared KB (limit) | "
             "fail to compile |", "|---|---|---:|---:|---:|---:|---:|"]
    for kernel in sorted({r["kernel"] for r in rows}):
        for t in TARGETS:
            mine = [r for r in rows if r["kernel"] == kernel and r["target"] == t.name]
            ok = [r for r in mine if "error" not in r]
            if not mine:
                continue
            spilling = [r["spills"] for r in ok if r["spills"]]
            lines.append(f"| {kernel} | {t.name} | {len(mine)} | {max(r['regs'] for r in ok)} | "
                         f"{len(spilling)} ({max(spilling, default=0)}) | "
                         f"{max(r['smem'] for r in ok) // 1024} ({t.smem_limit // 1024}) | {len(mine) - len(ok)} |")
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict) -> None:
    """results/kernel-resources.json (every row) and .md (the table), and the summary in benchmarks/README.md."""
    body = json.dumps(meta)[:-1] + ', "rows": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n]}\n"
    RESULTS_JSON.write_text(body)  # a row a line: diffs stay readable
    header = (f"# Triton kernels compiled for NVIDIA targets\n\n{meta['date']} · triton {meta['triton']} · "
              f"{len(rows)} compilations in {meta['compile_seconds']} s on {meta['cpu']} "
              "(`python -m benchmarks.kernel_resources`).\n\nCells: registers per thread · spill store bytes · "
              "shared memory KB per block. **over**: a target limit broken (spills, or shared memory over "
              "the target's per-block maximum); (known): one listed in KNOWN_PROBLEMS. "
              "Configs: dtype, layout, whether every integer argument is a multiple of 16 (aligned), constexprs, "
              "warps, stages, and the arguments Triton specialised to the constant 1.\n\n")
    RESULTS_MD.write_text(header + markdown_table(rows))
    readme = REPO / "benchmarks" / "README.md"
    text = readme.read_text()
    begin, end = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"
    block = (f"{begin}\n{meta['date']} · triton {meta['triton']} · {len(rows)} compilations "
             f"(results/kernel-resources.md has every one)\n\n{summary_table(rows)}\n{end}")
    if begin in text:
        text = text.split(begin)[0] + block + text.split(end, 1)[1]
    else:
        text += "\n" + block + "\n"
    readme.write_text(text)


def report(rows: list[dict]) -> bool:
    """Print what fails to compile, breaks a limit not in KNOWN_PROBLEMS, or is a known problem no longer
    seen; True when there is none."""
    found = [(p, known_problem(p, r["config"])) for r in rows if "error" not in r for p in limit_problems(Compiled(**r))]
    failures = [f"DOES NOT COMPILE: {r['error'].splitlines()[0]}" for r in rows if "error" in r]
    failures += [f"OVER A LIMIT: {p}" for p, known in found if known is None]
    failures += [f"KNOWN PROBLEM NO LONGER SEEN (remove it from KNOWN_PROBLEMS): {k.kernel} {k.kind}"
                 for k in KNOWN_PROBLEMS if all(known is not k for _, known in found)]
    for line in failures:
        print(line)
    print(f"{len(rows)} compilations, {sum('error' in r for r in rows)} failed to compile, "
          f"{sum(known is not None for _, known in found)} known limit problems")
    return not failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    parser.add_argument("--rewrite", action="store_true",
                        help="no compiling: rebuild the .md table and the README summary from results/kernel-resources.json")
    args = parser.parse_args()
    if args.rewrite:
        saved = json.loads(RESULTS_JSON.read_text())
        rows = saved.pop("rows")
        write_results(rows, saved)
    else:
        import triton

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            os.environ.setdefault("TRITON_CACHE_DIR", cache)  # ~2500 kernels: keep them out of ~/.triton
            rows = run_all(args.workers)
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    triton=triton.__version__, cpu=_cpu_model(), compile_seconds=round(time.perf_counter() - start),
                    targets=[dataclasses.asdict(t) for t in TARGETS])
        write_results(rows, meta)
    print(f"wrote {RESULTS_JSON.relative_to(REPO)}, {RESULTS_MD.relative_to(REPO)} and benchmarks/README.md")
    if not report(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

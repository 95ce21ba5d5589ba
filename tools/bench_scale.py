"""Memory and time of `slim-onnx compress` at real LLM shapes, on this machine.

For each configuration it builds a decoder with real layer shapes and random weights
(tools/scale_model.py: Llama-3.2-1B, Llama-3-8B with some of its 32 blocks), writes 16 calibration
windows of 512 random tokens, and runs `slim-onnx compress` (default configuration, streamed
calibration) in a child process. It prints, side by side:
  peak RSS     the child's maximum resident set (os.wait4), weights memory-mapped included
  s/block      mean seconds of a transformer block (statistics + compression + next inputs),
               from slim_report.json; lm_head (its own block) separately
  total        the child's wall time, model loading and writing included
  output       the compressed folder's size
and, for the 8B shape, the projected time of all 32 blocks and how flat the memory is in depth
(peak RSS of the most blocks over that of the fewest; target <= 1.2x).

    python tools/bench_scale.py                      # 8b:2, 8b:4, 8b:8, 1b:16 (over an hour on 2 cores)
    python tools/bench_scale.py --configs 8b:2 8b:4 --work /data/scale
The work folder needs room for the models (8b:8 is 11 GiB of float32 weights); it is kept, so a
second run reuses the models it built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_model import PRESETS, random_calibration_npz, write_llama


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def build(work: Path, preset: str, blocks: int, windows: int, seqlen: int) -> tuple[Path, Path]:
    """The model folder and calibration .npz of one configuration (reused when already built)."""
    folder = work / f"{preset}-{blocks}"
    shapes = dict(PRESETS[preset], blocks=blocks)
    if not (folder / "model.onnx").is_file():
        partial = folder.with_name(folder.name + ".partial")  # renamed once complete
        shutil.rmtree(partial, ignore_errors=True)
        write_llama(partial, **shapes)
        partial.rename(folder)
    npz = work / f"calib-{preset}-{windows}x{seqlen}.npz"
    if not npz.is_file():
        random_calibration_npz(npz, vocab=shapes["vocab"], windows=windows, seqlen=seqlen)
    return folder, npz


def compress_measured(model: Path, npz: Path, out: Path, extra: list[str]) -> dict:
    """Run the CLI in a child process: its peak RSS, wall seconds and report."""
    command = [sys.executable, "-m", "slim_onnx.cli", "compress", str(model), str(out), "--calib", str(npz),
               "--overwrite", "-v", *extra]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compress failed for {model}: see {out.with_suffix('.log')}")
    report = json.loads((out / "slim_report.json").read_text())
    return {"peak_rss": usage.ru_maxrss * 1024, "seconds": seconds, "report": report, "output_bytes": _folder_bytes(out)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["8b:2", "8b:4", "8b:8", "1b:16"],
                        help="PRESET:BLOCKS, presets: " + ", ".join(sorted(PRESETS)))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/slim-onnx-bench-scale"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("compress_args", nargs="*", help="after --: extra `slim-onnx compress` options")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    print(f"{'config':8} {'blocks':>6} {'peak RSS':>9} {'s/block':>8} {'lm_head':>8} {'total':>8} {'output':>9} "
          f"{'cache':>8}", flush=True)
    for spec in args.configs:
        preset, blocks = spec.split(":")
        model, npz = build(args.work, preset, int(blocks), args.windows, args.seqlen)
        result = compress_measured(model, npz, args.work / f"{preset}-{blocks}-slim", args.compress_args)
        timings = result["report"]["streaming"]["blocks"]
        per_block = [t["seconds"] for t in timings[:-1]]  # the last block is lm_head
        row = {"config": spec, "preset": preset, "blocks": int(blocks), "peak_rss_bytes": result["peak_rss"],
               "seconds_per_block": sum(per_block) / len(per_block), "lm_head_seconds": timings[-1]["seconds"],
               "seconds": result["seconds"], "output_bytes": result["output_bytes"],
               "activation_cache_peak_bytes": result["report"]["streaming"]["activation_cache_peak_bytes"],
               "block_timings": timings}
        rows.append(row)
        print(f"{spec:8} {row['blocks']:>6} {row['peak_rss_bytes'] / 2**30:>7.2f} G {row['seconds_per_block']:>7.1f}s "
              f"{row['lm_head_seconds']:>7.1f}s {row['seconds']:>7.0f}s {row['output_bytes'] / 2**30:>7.2f} G "
              f"{row['activation_cache_peak_bytes'] / 2**20:>6.0f} M", flush=True)

    for preset in sorted({r["preset"] for r in rows}):
        same = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["blocks"])
        full = PRESETS[preset]["blocks"]
        last = same[-1]
        fixed = last["seconds"] - last["seconds_per_block"] * last["blocks"]  # loading, lm_head, rewrite, writing
        print(f"{preset}: projected for all {full} blocks: {(fixed + last['seconds_per_block'] * full) / 60:.0f} min "
              f"({last['seconds_per_block']:.0f} s per block + {fixed:.0f} s for the rest)")
        if len(same) > 1:
            print(f"{preset}: peak RSS {same[-1]['blocks']} blocks / {same[0]['blocks']} blocks = "
                  f"{same[-1]['peak_rss_bytes'] / same[0]['peak_rss_bytes']:.2f}x (target <= 1.2x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

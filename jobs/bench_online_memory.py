"""Benchmark: peak memory of online (streaming) mode as the input grows. Each length runs in its own process.

Peak RSS is measured from the kernel's high-water mark (VmHWM), reset after the model is loaded, so the figure is
what streaming itself adds. Text: the concatenated pydoc topics (113K tokens, on every Python install).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(length: int, k: int, window: int, block: int) -> dict:
    import torch

    from extensible.plugins import load_extensible
    from extensible.text import tokenize
    from pipeline.corpus import pydoc_topics

    torch.set_num_threads(2)
    lm = load_extensible(window=window)
    ids = tokenize(lm.tokenizer, "\n\n".join(pydoc_topics().values()))[:length]
    if len(ids) < length:
        raise SystemExit(f"the text has only {len(ids)} tokens")
    session = lm.stream(k)
    session.feed(ids[:block])  # warm-up allocations of the first session
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: measure streaming only
    loaded = _status_kib("VmRSS")
    start = time.perf_counter()
    nll = []
    for i in range(block, length, block):
        nll.append(-session.feed(ids[i : i + block]))
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"tokens": length, "k": k, "window": window, "rss_after_load_mib": loaded / 1024,
            "peak_rss_mib": peak / 1024, "added_mib": (peak - loaded) / 1024, "held_tokens": len(session.ex) + len(session.raw),
            "tokens_per_s": (length - block) / seconds, "ppl_last_512": float(torch.cat(nll)[-512:].mean().exp())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--out", default="out/bench/online_memory.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.k, args.window, args.block)))
        return
    rows = []
    for length in args.lengths:
        cmd = [sys.executable, "-m", "jobs.bench_online_memory", "--worker", str(length), "--k", str(args.k),
               "--window", str(args.window), "--block", str(args.block)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{length:>6} tokens: peak RSS {rows[-1]['peak_rss_mib']:7.1f} MiB "
              f"(+{rows[-1]['added_mib']:6.1f} over the loaded model), {rows[-1]['tokens_per_s']:6.0f} tokens/s", flush=True)
    peaks = [row["peak_rss_mib"] for row in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    print(f"online mode, k={args.k}, window {args.window}: peak RSS spread {spread:.1%} across "
          f"{args.lengths[0]}..{args.lengths[-1]} tokens (goal: flat within 10%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "peak_spread": spread}, indent=2))


if __name__ == "__main__":
    main()

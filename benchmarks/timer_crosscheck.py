"""Cross-check seqbench's timing against torch.utils.benchmark.Timer on the same model and input.

    .venv/bin/python benchmarks/timer_crosscheck.py [CONFIG] [--model NAME] [--seq-len L]

Runs one prefill point through seqbench's own measurement path (``run_point``), then times the same call
with ``torch.utils.benchmark.Timer`` at the same thread count, and prints both medians and their ratio.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

from seqbench.experiment import load_experiment
from seqbench.run.point import PointSpec, build, run_point
from seqbench.run.workloads import prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/cpu.yaml")
    ap.add_argument("--model", default=None, help="model name (default: every model)")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    exp = load_experiment(args.config)
    threads = exp.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    names = [args.model] if args.model else [m.name for m in exp.models]
    print(f"prefill, batch 1, L={args.seq_len}, {threads} threads, {exp.dtype}")
    print(f"{'model':>12} {'seqbench median':>16} {'Timer median':>14} {'ratio':>7}")
    for name in names:
        spec = PointSpec("crosscheck", exp.model_dump(mode="json"), name, "prefill", 1, args.seq_len, "cpu")
        model = build(spec)
        row = run_point(spec, model)
        work = prefill(model, 1, args.seq_len, torch.device("cpu"), exp.seed, prefill_chunk=exp.measure.prefill_chunk)
        timer = tb.Timer(stmt="call()", globals={"call": work.call}, num_threads=threads)
        ref = timer.blocked_autorange(min_run_time=max(2.0, 10 * row["time_median_s"]))
        ratio = row["time_median_s"] / ref.median
        print(f"{name:>12} {row['time_median_s'] * 1e3:>13.2f} ms {ref.median * 1e3:>11.2f} ms {ratio:>7.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""OpenVINO's per-layer profile of a serving file, loaded as the worker loads it: the figures behind the model
card's and docs/benchmarks.md's accounts of where an int8 forward pass goes.

    python scripts/openvino_profile.py [MODEL.xml] [--batch 8] [--threads 1] [--passes 40] [--top 25]
    taskset -c 0 python scripts/openvino_profile.py dfmod/models/mnv4s-faces256.int8.xml
    taskset -c 0 python scripts/openvino_profile.py NEW.xml --against OLD.xml   # img/s, alternating rounds

The model goes through :class:`dfmod.detector.OpenVinoRunner`'s load (the head rewritten as a MatMul), is
compiled with ``PERF_COUNT`` for one stream of ``--threads`` threads, and runs ``--passes`` passes of random
pixels after a warm-up. Printed: wall time per pass, the summed layer time per pass, that time by layer type and
kernel, and the costliest layers. With ``--against OTHER.xml``: instead, img/s of both files through
:class:`dfmod.detector.OpenVinoRunner` (int8, slices, ``--threads``) at batch 32, in ``--rounds`` alternating
rounds of 1.5 s, each round and the medians.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from dfmod.detector import OpenVinoRunner, measure_throughput, openvino_core, pointwise_convolutions_as_matmuls


def alternating_throughput(paths: list[Path], threads: int, rounds: int) -> None:
    """img/s of each file at batch 32, the files taking turns so that each round sees the machine alike."""
    runners = [OpenVinoRunner(path, "int8", threads=threads) for path in paths]
    pixels = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    for runner in runners:
        for _ in range(5):
            runner.logits(pixels)
    runs: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for runner, figures in zip(runners, runs, strict=True):
            figures.append(measure_throughput(runner.logits, pixels, 1.5)[0])
    for path, figures in zip(paths, runs, strict=True):
        print(f"{path}: median {np.median(figures):.0f} img/s, rounds {[round(f) for f in figures]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("dfmod/models/mnv4s-faces256.int8.xml"))
    parser.add_argument("--batch", type=int, default=8, help="images per pass (the runner's slice)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--against", type=Path, default=None, help="another .xml: compare img/s instead")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.against:
        alternating_throughput([args.against, args.model], args.threads, args.rounds)
        return

    core = openvino_core()
    model = core.read_model(str(args.model))
    rewrites = pointwise_convolutions_as_matmuls(model)
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": True,
    })
    request = compiled.create_infer_request()
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    for _ in range(10):
        request.infer({0: pixels})
    by_layer: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    started = time.perf_counter()
    for _ in range(args.passes):
        request.infer({0: pixels})
        for layer in request.profiling_info:
            ms = layer.real_time.total_seconds() * 1e3 / args.passes
            by_layer[(layer.node_name, layer.node_type, layer.exec_type)] += ms
            by_kind[(layer.node_type, layer.exec_type)] += ms
    wall = (time.perf_counter() - started) / args.passes * 1e3
    print(f"{args.model.name}: batch {args.batch}, {args.threads} thread(s), {rewrites} convolution(s) run as MatMul")
    print(f"wall per pass {wall:.2f} ms, layers per pass {sum(by_layer.values()):.2f} ms")
    print("\nby layer type and kernel (ms per pass)")
    for (kind, kernel), ms in by_kind.most_common():
        if ms > 0:
            print(f"{ms:8.3f}  {kind} ({kernel})")
    print(f"\nthe {args.top} costliest layers (ms per pass)")
    for (name, kind, kernel), ms in by_layer.most_common(args.top):
        print(f"{ms:8.3f}  {kind} ({kernel})  {name}")


if __name__ == "__main__":
    main()

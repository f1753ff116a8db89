"""Capacity on paper for docs/operations.md: a KEDA-scaled worker pool under a 10x burst, and the fleet a daily
volume needs.

``simulate``: a queue fed by a seeded Poisson trace (a baseline rate with a 10x burst), drained by worker pods
that KEDA scales: every ``polling_s`` it reads the queue metric (the Redis list only, which misses the
``prefetch`` messages each ready worker holds, or waiting + in flight), asks for ``ceil(metric / target)``
replicas, and the HPA under it scales up at most ``max(4 pods, 100 %)`` per ``scale_up_period_s`` and down
only to the highest wish of the last ``scale_down_window_s`` (Kubernetes' defaults: 15 s, 300 s). A new pod
serves after ``startup_s`` (scheduling, image pull, model load). Work is tracked as cohorts (arrival second,
count), so p99 upload-to-verdict is exact for the model at any rate. Service per pod is the measured
end-to-end rate; each image also spends one batch time in its batch.

``plan``: images/day -> average and peak img/s -> worker pods -> monthly cost at given hourly prices.

    python scripts/capacity_sim.py simulate             # today's chart defaults vs tuned ones
    python scripts/capacity_sim.py plan                 # 1 M, 100 M, 1 B images/day
    python scripts/capacity_sim.py simulate --json --minutes 20   # small, machine-readable (the test)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

#: README's measured figure: one 2-vCPU CPU worker end to end (Postgres, Redis, S3 server on the same cores).
CPU_POD_IMG_S = 140.0


@dataclass(frozen=True)
class Pool:
    name: str
    img_s_per_pod: float = CPU_POD_IMG_S
    batch_size: int = 32
    concurrency: int = 1  # batches in flight per pod (threads pool)
    batch_wait_s: float = 0.05
    min_replicas: int = 1
    initial_replicas: int | None = None  # ready at t=0; default min_replicas
    max_replicas: int = 10
    list_length: int = 64  # KEDA target per replica, beyond what workers hold
    polling_s: float = 15.0
    cooldown_s: float = 300.0  # KEDA: to minReplicaCount 0 after this long inactive
    count_in_flight: bool = False  # prometheus trigger on dfmod_queue_depth (waiting + in flight)
    startup_s: float = 60.0
    scale_up_period_s: float = 15.0
    scale_down_window_s: float = 300.0

    @property
    def prefetch(self) -> int:
        return self.batch_size * self.concurrency

    @property
    def batch_time_s(self) -> float:
        return self.batch_size / self.img_s_per_pod


TODAY = Pool("today's defaults (redis trigger, listLength 64, polling 15 s, min 1)")
TUNED = replace(
    TODAY,
    name="tuned (waiting+in-flight trigger, target 32+32, polling 5 s, scale-up every 5 s, min 2, max 10)",
    list_length=32, polling_s=5.0, count_in_flight=True, scale_up_period_s=5.0, min_replicas=2,
)


@dataclass(frozen=True)
class Trace:
    base_img_s: float = 40.0
    burst_factor: float = 10.0
    burst_start_s: float = 900.0
    burst_s: float = 600.0
    duration_s: float = 3600.0
    seed: int = 7

    def rates(self, dt: float) -> np.ndarray:
        t = np.arange(0.0, self.duration_s, dt)
        burst = (t >= self.burst_start_s) & (t < self.burst_start_s + self.burst_s)
        return np.where(burst, self.base_img_s * self.burst_factor, self.base_img_s)

    def arrivals(self, dt: float) -> np.ndarray:
        return np.random.default_rng(self.seed).poisson(self.rates(dt) * dt)


@dataclass
class Result:
    scenario: str
    images: int
    p50_s: float
    p99_s: float
    max_s: float
    peak_pods: int
    pod_hours: float
    waiting_at_end: int


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, q * cumulative[-1])])


def simulate(pool: Pool, trace: Trace, dt: float = 0.25) -> Result:
    arrivals = trace.arrivals(dt)
    queue: collections.deque[list[float]] = collections.deque()  # [arrival time, images left]
    waiting = 0.0
    initial = pool.min_replicas if pool.initial_replicas is None else pool.initial_replicas
    ready_at: list[float] = [0.0] * initial  # pods present at t=0 are ready
    wishes: collections.deque[tuple[float, int]] = collections.deque()
    last_scale_up = -math.inf
    last_active = 0.0
    latencies, weights = [], []
    peak, pod_seconds = len(ready_at), 0.0
    steps_per_poll = max(1, round(pool.polling_s / dt))
    service = pool.batch_time_s + pool.batch_wait_s
    recent: collections.deque[tuple[float, float]] = collections.deque()  # (time, images) served lately
    for step, arrived in enumerate(arrivals):
        now = step * dt
        if arrived:
            queue.append([now, float(arrived)])
            waiting += arrived
        ready = sum(1 for t in ready_at if t <= now)
        capacity = ready * pool.img_s_per_pod * dt
        served = 0.0
        while capacity > 1e-9 and queue:
            cohort = queue[0]
            taken = min(capacity, cohort[1])
            latencies.append(now + dt - cohort[0] + service)
            weights.append(taken)
            cohort[1] -= taken
            waiting -= taken
            capacity -= taken
            served += taken
            if cohort[1] <= 1e-9:
                queue.popleft()
        recent.append((now, served))
        while recent and recent[0][0] <= now - service:
            recent.popleft()
        if step % steps_per_poll == 0:
            # Fetched and unacknowledged, so not in the Redis list: the batches being processed (what was
            # served within one batch time) and what workers buffered for their next batch.
            in_process = min(sum(images for _, images in recent), ready * pool.prefetch)
            buffered = min(waiting, ready * pool.prefetch - in_process)
            metric = waiting + in_process if pool.count_in_flight else waiting - buffered
            target = pool.list_length + (pool.prefetch if pool.count_in_flight else 0)
            if metric > 0:
                last_active = now
            active = metric > 0 or now - last_active < pool.cooldown_s
            floor = max(pool.min_replicas, 1) if active else pool.min_replicas
            wish = min(pool.max_replicas, max(floor, math.ceil(metric / target)))
            wishes.append((now, wish))
            while wishes and wishes[0][0] < now - pool.scale_down_window_s:
                wishes.popleft()
            current = len(ready_at)
            if wish > current and now - last_scale_up >= pool.scale_up_period_s:
                step_up = min(wish, current + max(4, current))
                ready_at += [now + pool.startup_s] * (step_up - current)
                last_scale_up = now
            elif wish < current:
                keep = max(w for _, w in wishes) if active else wish
                if keep < current:
                    ready_at = sorted(ready_at)[:keep]  # the newest (maybe still starting) pods go first
        peak = max(peak, len(ready_at))
        pod_seconds += len(ready_at) * dt
    values, w = np.array(latencies), np.array(weights)
    return Result(
        scenario=pool.name, images=int(arrivals.sum()), p50_s=_weighted_quantile(values, w, 0.50),
        p99_s=_weighted_quantile(values, w, 0.99), max_s=float(values.max()), peak_pods=peak,
        pod_hours=pod_seconds / 3600.0, waiting_at_end=int(round(waiting)),
    )


@dataclass(frozen=True)
class PlanRow:
    images_per_day: float
    avg_img_s: float
    peak_img_s: float
    cpu_pods_avg: int
    cpu_pods_peak: int
    cpu_usd_month: float
    gpu_pods_avg: int
    gpu_usd_month: float


def plan(images_per_day: float, peak_factor: float, headroom: float, cpu_pod_img_s: float, cpu_usd_h: float,
         gpu_pod_img_s: float, gpu_usd_h: float, min_pods: int = 2, hours_month: float = 730.0) -> PlanRow:
    """Pods for the average (KEDA follows the daily curve) and the peak, and what the average fleet costs."""
    avg = images_per_day / 86400.0
    peak = avg * peak_factor
    cpu_avg = max(min_pods, math.ceil(avg * headroom / cpu_pod_img_s))
    cpu_peak = max(min_pods, math.ceil(peak * headroom / cpu_pod_img_s))
    gpu_avg = max(min_pods, math.ceil(avg * headroom / gpu_pod_img_s))
    return PlanRow(
        images_per_day, avg, peak, cpu_avg, cpu_peak, cpu_avg * cpu_usd_h * hours_month,
        gpu_avg, gpu_avg * gpu_usd_h * hours_month,
    )


def _print_simulation(results: list[Result], trace: Trace) -> None:
    print(f"trace: {trace.base_img_s:g} img/s, x{trace.burst_factor:g} for {trace.burst_s:g} s from "
          f"t={trace.burst_start_s:g} s, {trace.duration_s:g} s in all (seed {trace.seed})")
    print(f"{'scenario':<100} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'peak pods':>9} {'pod-h':>6}")
    for r in results:
        print(f"{r.scenario:<100} {r.p50_s:7.2f} {r.p99_s:7.1f} {r.max_s:7.1f} {r.peak_pods:9d} {r.pod_hours:6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="p99 upload-to-verdict under a burst, today's defaults vs tuned")
    sim.add_argument("--base-img-s", type=float, default=Trace.base_img_s)
    sim.add_argument("--burst-factor", type=float, default=Trace.burst_factor)
    sim.add_argument("--minutes", type=float, default=Trace.duration_s / 60)
    sim.add_argument("--startup-s", type=float, default=Pool.startup_s, help="pod start to first batch")
    sim.add_argument("--seed", type=int, default=Trace.seed)
    sim.add_argument("--json", action="store_true")
    pl = sub.add_parser("plan", help="images/day -> pods -> monthly cost")
    pl.add_argument("--peak-factor", type=float, default=3.0, help="peak hour / daily average")
    pl.add_argument("--headroom", type=float, default=1.3)
    pl.add_argument("--cpu-pod-img-s", type=float, default=CPU_POD_IMG_S)
    pl.add_argument("--cpu-usd-h", type=float, default=0.0816, help="m7g.large on demand, us-east-1")
    pl.add_argument("--gpu-pod-img-s", type=float, default=1000.0,
                    help="GPU pod bound by its CPU data path: 4 vCPU at ~4 ms worker CPU per image")
    pl.add_argument("--gpu-usd-h", type=float, default=1.006, help="g5.xlarge on demand, us-east-1")
    pl.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "simulate":
        duration = args.minutes * 60
        trace = Trace(base_img_s=args.base_img_s, burst_factor=args.burst_factor, duration_s=duration,
                      burst_start_s=duration / 4, burst_s=duration / 6, seed=args.seed)
        pools = [replace(pool, startup_s=args.startup_s) for pool in (TODAY, TUNED)]
        results = [simulate(pool, trace) for pool in pools]
        if args.json:
            print(json.dumps({"trace": asdict(trace), "results": [asdict(r) for r in results]}))
        else:
            _print_simulation(results, trace)
        return 0

    rows = [plan(volume, args.peak_factor, args.headroom, args.cpu_pod_img_s, args.cpu_usd_h,
                 args.gpu_pod_img_s, args.gpu_usd_h) for volume in (1e6, 1e8, 1e9)]
    if args.json:
        print(json.dumps([asdict(row) for row in rows]))
        return 0
    print(f"peak = {args.peak_factor:g} x average, headroom x{args.headroom:g}, at least 2 pods; "
          f"CPU pod {args.cpu_pod_img_s:g} img/s at ${args.cpu_usd_h}/h, GPU pod {args.gpu_pod_img_s:g} img/s "
          f"at ${args.gpu_usd_h}/h, 730 h/month")
    print("| images/day | avg img/s | peak img/s | CPU pods avg / peak | CPU $/month (avg fleet) | GPU pods avg | GPU $/month |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.images_per_day:,.0f} | {r.avg_img_s:,.0f} | {r.peak_img_s:,.0f} | {r.cpu_pods_avg} / "
              f"{r.cpu_pods_peak} | {r.cpu_usd_month:,.0f} | {r.gpu_pods_avg} | {r.gpu_usd_month:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

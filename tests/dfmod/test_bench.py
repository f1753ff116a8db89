"""``dfmod bench`` end to end on embedded defaults: every phase runs through real worker and API processes,
and ``--json`` carries the keys the issue asks for plus the CPU accounting."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

from dfmod.bench import MODEL_ONLY_ROUNDS
from tests.utils.processes import REPO_ROOT


@pytest.mark.timeout(900)  # the bench's own limit (600 s) must fire first, so it can stop what it started
def test_bench_json_reports_every_phase_and_where_the_cpu_went(tmp_path, exported_checkpoint):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_CHECKPOINT": str(exported_checkpoint),
        "DFMOD_TORCH_THREADS": "1",
        "DFMOD_BATCH_SIZE": "8",
    }
    completed = subprocess.run(
        [
            sys.executable, "-m", "dfmod", "bench", "--json", "--images", "24", "--unbatched-images", "4",
            "--latency-seconds", "2", "--rate", "2", "--model-seconds", "0.5", "--repeats", "2", "--log-dir", str(tmp_path / "logs"),
        ],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    for key in ("model_only_img_s", "end_to_end_img_s", "unbatched_img_s", "p50_ms", "p99_ms"):
        assert result[key] > 0, key
    assert result["p99_ms"] >= result["p50_ms"]
    assert result["repeats"] == 2 and len(result["end_to_end_runs_img_s"]) == len(result["unbatched_runs_img_s"]) == 2
    assert min(result["end_to_end_runs_img_s"]) <= result["end_to_end_img_s"] <= max(result["end_to_end_runs_img_s"])
    assert result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["backends"] == {"database": "sqlite", "broker": "filesystem", "storage": "s3 (moto_server)"}
    assert result["model_cpu_ms"] > 0 and len(result["model_cpu_ms_runs"]) == 2
    assert result["model_cpu_ms"] == pytest.approx(sum(result["model_cpu_ms_runs"]) / 2, abs=0.02)
    # The worker and the S3 server it read from both did measurable work for each image.
    assert result["end_to_end_cpu_ms"]["worker"] > result["model_cpu_ms"] * 0.5
    assert result["end_to_end_cpu_ms"]["s3 server"] > 0
    # Batches of more than one formed in the batched run; the unbatched run had only batches of one.
    batched_log = (tmp_path / "logs" / "worker.log").read_text()
    unbatched_log = (tmp_path / "logs" / "worker1.log").read_text()
    assert any(f"batch: {n} requested" in batched_log for n in range(2, 9))
    assert "batch: 1 requested" in unbatched_log and "batch: 2 requested" not in unbatched_log
    # The bench's workers never sweep: on an operator's database that would pull its other stuck items
    # onto the bench's queue, into the measured drains.
    assert "stuck-item sweep off" in batched_log and "stuck-item sweep off" in unbatched_log
    # auto's trial ran where the model-only phase ran, and every worker then served what it picked.
    assert "timed on this CPU" in result["backend_reason"]
    for log in (batched_log, unbatched_log):
        assert f"with backend {result['backend']} from" in log

    # Backends: the default is what auto picked (not torch: the model is exported), every installed backend
    # was measured at the same batch, and the end-to-end drain was repeated with a torch worker.
    assert result["backend"].startswith(("openvino-", "onnxruntime-")) and result["backend_reason"].startswith("auto")
    assert {"torch-fp32", "onnxruntime-fp32", "openvino-fp32"} <= set(result["model_only_by_backend"])
    assert result["backend"] in result["model_only_by_backend"]
    assert all(value > 0 for value in result["model_only_by_backend"].values())
    # Each backend's figure is the median of its rounds, the backends alternating round after round.
    runs = result["model_only_runs_by_backend"]
    assert set(runs) == set(result["model_only_by_backend"])
    for name, img_s in result["model_only_by_backend"].items():
        assert len(runs[name]) == MODEL_ONLY_ROUNDS and img_s == pytest.approx(statistics.median(runs[name]), abs=0.01)
    assert result["end_to_end_torch_img_s"] > 0 and len(result["end_to_end_torch_runs_img_s"]) == 2
    assert min(result["end_to_end_torch_runs_img_s"]) <= result["end_to_end_torch_img_s"] <= max(result["end_to_end_torch_runs_img_s"])
    torch_log = (tmp_path / "logs" / "workerT.log").read_text()
    assert "backend torch-fp32" in torch_log
    # Its drains alternated with the default worker's, each worker on its own queue: the torch worker
    # classified exactly its warm-up and its two drains, nothing of the default worker's.
    assert sum(int(n) for n in re.findall(r"batch: \d+ requested, (\d+) classified", torch_log)) == 8 + 2 * 24
    # The face stage was drained too, by a worker that really ran it (its model version says so).
    assert result["face_stage_images"] == 8 and result["end_to_end_faces_img_s"] > 0
    assert "+faces" in (tmp_path / "logs" / "workerF.log").read_text()
    assert result["worker_non_model_cpu_ms"] == pytest.approx(
        result["end_to_end_cpu_ms"]["worker"] - result["model_cpu_ms"], abs=0.02
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("services", [False, True], ids=["local", "services"])
def test_worker_only_bench_drives_the_batch_classifier_from_local_storage(exported_checkpoint, tmp_path, services):
    """Local storage and SQLite by default; with --services an S3 server (moto_server, started by the bench)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_CHECKPOINT": str(exported_checkpoint), "DFMOD_TORCH_THREADS": "1", "DFMOD_BATCH_SIZE": "8",
        "DFMOD_BACKEND": "onnxruntime", "DFMOD_PRECISION": "fp32",
    }
    completed = subprocess.run(
        [sys.executable, "-m", "dfmod", "bench", "--worker-only", "--json", "--images", "32",
         "--profile", str(tmp_path / "worker.prof"), *(["--services"] if services else [])],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["images"] == 32 and result["batch_size"] == 8 and result["backend"] == "onnxruntime-fp32"
    assert result["img_s"] > 0 and result["cpu_ms_per_image"] > result["model_cpu_ms_per_image"] > 0
    assert set(result["phases_ms_per_image"]) == {"claim", "fetch_decode", "inference", "persist"}
    assert (tmp_path / "worker.prof").stat().st_size > 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [[], ["--worker-only", "--services"]], ids=["full", "worker-only"])
def test_the_bench_never_migrates_a_configured_database_it_says_to_run_dfmod_migrate(mode):
    from dfmod import migrate
    from tests.utils.databases import scratch_postgres_database

    with scratch_postgres_database("dfmod_bench_unmigrated") as url:
        env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
            "DFMOD_DATABASE_URL": url,
        }
        completed = subprocess.run(
            [sys.executable, "-m", "dfmod", "bench", "--json", "--images", "8", *mode],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        )
        assert completed.returncode == 2, completed.stderr[-3000:]
        assert "run `dfmod migrate` first" in completed.stderr and "Traceback" not in completed.stderr
        assert migrate.current_revision(url) is None  # still the operator's to migrate


def test_cpu_lists_parse_as_the_kernel_writes_them():
    import typer

    from dfmod.bench import parse_cpu_list

    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("0,2-4") == {0, 2, 3, 4}
    for bad in ("", "a", "3-1", "1-", "-1"):
        with pytest.raises(typer.BadParameter):
            parse_cpu_list(bad)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_a_pinned_bench_process_runs_on_its_cpus_and_the_bench_keeps_its_own(tmp_path):
    from dfmod.bench import _Process

    mine = os.sched_getaffinity(0)
    worker_cpu = {min(mine)}
    script = "import os, pathlib, time; pathlib.Path(os.environ['OUT']).write_text(repr(sorted(os.sched_getaffinity(0)))); print('ready.', flush=True); time.sleep(30)"
    child = _Process([sys.executable, "-c", script, "child"], {**os.environ, "OUT": str(tmp_path / "cpus")},
                     tmp_path / "child.log", ready=b"ready.", cpus=worker_cpu)
    try:
        assert (tmp_path / "cpus").read_text() == repr(sorted(worker_cpu))
        assert os.sched_getaffinity(0) == mine  # the parent's mask is restored
    finally:
        child.stop()


def _recorded(factory, count: int) -> list[str]:
    from dfmod.db import session_scope
    from dfmod.lifecycle import NewItem, record_items

    with session_scope(factory) as session:
        recorded = record_items(session, [NewItem(bucket="uploads", key=f"poll/{i}.jpg", source="bench") for i in range(count)])
    return [r.item.id for r in recorded]


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_the_drain_poll_counts_finished_items_and_when_the_last_finished(dialect, clean_postgres, tmp_path):
    from sqlalchemy import func, select, update

    from dfmod import migrate
    from dfmod.bench import _finished
    from dfmod.db import Item, ItemStatus, make_engine, make_session_factory, session_scope
    from dfmod.settings import Settings

    url = clean_postgres if dialect == "postgresql" else f"sqlite:///{tmp_path}/poll.db"
    if dialect == "sqlite":
        migrate.upgrade(Settings(database_url=url))
    engine = make_engine(url)
    factory = make_session_factory(engine)
    ids = _recorded(factory, 5)
    assert _finished(factory, ids) == (0, None)
    with session_scope(factory) as session:
        session.execute(update(Item).where(Item.id.in_(ids[:2])).values(status=ItemStatus.classified))
        session.execute(update(Item).where(Item.id == ids[2]).values(status=ItemStatus.failed))
        last = session.scalar(select(func.max(Item.updated_at)).where(Item.id.in_(ids[:3])))
    assert _finished(factory, ids) == (3, last)
    assert _finished(factory, ids[3:]) == (0, None)
    engine.dispose()


def test_each_drain_refreshes_the_statistics_of_the_tables_the_workers_query(clean_postgres):
    from sqlalchemy import text

    from dfmod.bench import _analyze
    from dfmod.db import make_engine, make_session_factory

    engine = make_engine(clean_postgres)
    factory = make_session_factory(engine)
    _recorded(factory, 7)

    def estimated_rows() -> float:
        with engine.connect() as connection:
            return connection.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'items'"))

    assert estimated_rows() != 7  # truncated and refilled, never analysed: the planner's estimate is stale
    _analyze(factory)
    assert estimated_rows() == 7
    engine.dispose()



@pytest.mark.timeout(300)
@pytest.mark.parametrize("after_s", [0.0, 6.0], ids=["worker-starting", "draining"])
def test_a_terminated_bench_stops_what_it_started_and_leaves_no_folder(tmp_path, checkpoint_path, after_s):
    """SIGTERM while the worker is still starting, and in the middle of a drain: the bench exits with 143,
    every process it started is gone and so is its temporary folder."""
    import psutil

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_CHECKPOINT": str(checkpoint_path), "DFMOD_TORCH_THREADS": "1", "TMPDIR": str(temp),
    }
    err_path = tmp_path / "bench.err"
    with open(err_path, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dfmod", "bench", "--json", "--images", "4000", "--model-seconds", "0.5",
             "--repeats", "1"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
        )
        try:
            deadline = time.monotonic() + 200
            while b"end-to-end:" not in err_path.read_bytes() and time.monotonic() < deadline:
                assert process.poll() is None, err_path.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(after_s)
            children = psutil.Process(process.pid).children(recursive=True)
            assert children and list(temp.glob("dfmod-bench-*")), children
            process.terminate()
            assert process.wait(timeout=90) == 128 + signal.SIGTERM, err_path.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
    assert not list(temp.glob("dfmod-bench-*")), list(temp.rglob("*"))

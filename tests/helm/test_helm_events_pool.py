"""The events worker pool: callback deliveries and heatmaps consumed by their own Deployment, so a slow callback
receiver never holds a classifying worker; the classify pools consume the classify queue only while it runs,
and both queues when it is disabled (callbacks must still be delivered)."""

from __future__ import annotations

import pytest
import yaml

CLASSIFY_QUEUE = "dfmod-classify"
EVENTS_QUEUE = "dfmod-events"


def _worker(chart, out, pool):
    return out.get("Deployment", f"{chart.fullname}-worker-{pool}")


def _container(chart, out, pool):
    return chart.container(_worker(chart, out, pool)["spec"]["template"]["spec"])


def _consumed(ctr):
    """The queues `dfmod worker --queues Q1,Q2` is told to consume."""
    args = ctr["args"]
    assert args[0] == "worker" and args.count("--queues") == 1, args
    return args[args.index("--queues") + 1].split(",")


def test_events_pool_is_rendered_by_default_and_consumes_the_events_queue_only(chart, rendered):
    out = rendered["default"]
    ctr = _container(chart, out, "events")
    assert ctr["command"] == ["dfmod"]
    assert _consumed(ctr) == [EVENTS_QUEUE]
    env = chart.env(ctr)
    # Classify tasks still go to the classify queue (the sweep re-enqueues stuck items from any pool).
    assert env["DFMOD_QUEUE"] == CLASSIFY_QUEUE
    assert env["DFMOD_TORCH_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["DFMOD_DEVICE"] == "cpu"
    assert env["DFMOD_BATCH_SIZE"] == "1"  # prefetch of one: the rest waits in Redis for other replicas
    assert "nvidia.com/gpu" not in str(ctr["resources"])
    assert ctr["resources"]["limits"]["memory"] and ctr["resources"]["requests"]["cpu"]
    config = out.get("ConfigMap", chart.fullname)["data"]
    assert config["DFMOD_EVENTS_QUEUE"] == EVENTS_QUEUE  # where the API publishes callbacks and heatmaps
    assert config["DFMOD_QUEUE"] == CLASSIFY_QUEUE


def test_events_pool_has_its_own_strategy_pdb_and_liveness(chart, rendered):
    out = rendered["default"]
    deployment = _worker(chart, out, "events")
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert deployment["spec"]["replicas"] == 1
    pdb = out.get("PodDisruptionBudget", f"{chart.fullname}-worker-events")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "worker-events"
    assert all(deployment["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ctr = _container(chart, out, "events")
    assert ctr["livenessProbe"]["exec"]["command"][:3] == ["dfmod", "worker-alive", "--max-age"]
    assert ctr["startupProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


@pytest.mark.parametrize("scenario_name", ["default", "gpu"])
def test_classify_pools_consume_the_classify_queue_only(chart, rendered, scenario_name):
    out = rendered[scenario_name]
    pools = ["cpu", "gpu"] if scenario_name == "gpu" else ["cpu"]
    for pool in pools:
        assert _consumed(_container(chart, out, pool)) == [CLASSIFY_QUEUE], pool
    assert _consumed(_container(chart, out, "events")) == [EVENTS_QUEUE]


def test_disabling_the_events_pool_gives_both_queues_back_to_the_classify_pools(chart):
    out = chart.render("gpu", {"workers": {"events": {"enabled": False}}})
    assert out.maybe("Deployment", f"{chart.fullname}-worker-events") is None
    assert out.maybe("PodDisruptionBudget", f"{chart.fullname}-worker-events") is None
    for pool in ("cpu", "gpu"):
        assert _consumed(_container(chart, out, pool)) == [CLASSIFY_QUEUE, EVENTS_QUEUE], pool


def test_renamed_queues_reach_every_pool(chart):
    out = chart.render("default", {
        "queue": "verdicts", "eventsQueue": "hooks", "workers": {"cpu": {"queue": "cpu-only"}},
    })
    assert _consumed(_container(chart, out, "cpu")) == ["cpu-only"]
    events = _container(chart, out, "events")
    assert _consumed(events) == ["hooks"]
    assert chart.env(events)["DFMOD_QUEUE"] == "verdicts"
    assert out.get("ConfigMap", chart.fullname)["data"]["DFMOD_EVENTS_QUEUE"] == "hooks"


def test_keda_scales_the_events_pool_on_the_events_queue_with_the_redis_trigger(chart, rendered):
    out = rendered["keda"]
    spec = out.get("ScaledObject", f"{chart.fullname}-worker-events")["spec"]
    trigger = spec["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == EVENTS_QUEUE
    cpu = out.get("ScaledObject", f"{chart.fullname}-worker-cpu")["spec"]["triggers"][0]
    assert cpu["metadata"]["listName"] == CLASSIFY_QUEUE
    assert "replicas" not in _worker(chart, out, "events")["spec"]  # KEDA owns the count


def test_prometheus_trigger_leaves_the_events_pool_at_its_replica_count(chart):
    # dfmod_queue_depth measures the classify queue only: a ScaledObject on it would read nothing.
    out = chart.render("keda", {
        "keda": {"trigger": "prometheus", "prometheus": {"serverAddress": "http://prometheus:9090"}},
        "workers": {"events": {"replicaCount": 2}},
    })
    assert out.maybe("ScaledObject", f"{chart.fullname}-worker-events") is None
    assert out.get("ScaledObject", f"{chart.fullname}-worker-cpu")
    assert _worker(chart, out, "events")["spec"]["replicas"] == 2


def test_events_pool_defaults_are_small_and_gpu_free(chart):
    values = yaml.safe_load((chart.chart_dir / "values.yaml").read_text())
    events = values["workers"]["events"]
    assert events["enabled"] is True and events["gpus"] == 0 and events["torchThreads"] == 1
    assert events["queue"] == ""
    assert values["eventsQueue"] != values["queue"]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        pytest.param({"eventsQueue": ""}, "eventsQueue", id="events-queue-empty"),
        pytest.param({"eventsQueue": "hooks and more"}, "eventsQueue", id="events-queue-bad-name"),
        pytest.param({"workers": {"events": {"enabled": "yes"}}}, "enabled", id="enabled-not-boolean"),
        pytest.param({"workers": {"events": {"torchThreads": 0}}}, "torchThreads", id="torch-threads-zero"),
        pytest.param({"workers": {"events": {"replica": 2}}}, "replica", id="unknown-key"),
        pytest.param({"workers": {"events": {"gpus": -1}}}, "gpus", id="gpus-negative"),
    ],
)
def test_schema_rejects_bad_events_values(chart, overrides, needle):
    with pytest.raises(Exception, match=needle):
        chart.render("default", overrides)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        pytest.param({"eventsQueue": "dfmod-classify"}, "eventsQueue must differ", id="same-queue"),
        pytest.param({"workers": {"events": {"queue": "other"}}}, "workers.events.queue", id="events-pool-queue"),
        pytest.param({"workers": {"events": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}},
                     "workers.events.autoscaling.minReplicas", id="hpa-min-above-max"),
    ],
)
def test_contradicting_values_fail_with_a_clear_message(chart, overrides, needle):
    with pytest.raises(Exception, match=needle):
        chart.render("default", overrides)


def test_events_pool_metrics_are_scraped_and_reachable(chart, rendered):
    out = rendered["full"]
    labels = _worker(chart, out, "events")["spec"]["template"]["metadata"]["labels"]
    component = labels["app.kubernetes.io/component"]
    for kind in ("ServiceMonitor", "NetworkPolicy"):
        worker_selectors = [
            expression["values"]
            for doc in out.of_kind(kind)
            for expression in doc["spec"].get("selector", doc["spec"].get("podSelector", {})).get("matchExpressions", [])
            if expression["key"] == "app.kubernetes.io/component" and "worker-cpu" in expression["values"]
        ]
        assert worker_selectors, kind
        assert all(component in values for values in worker_selectors), kind
    assert out.get("Service", f"{chart.fullname}-worker-events-metrics")["spec"]["ports"][0]["targetPort"] == "metrics"
    assert f"worker-events <- {EVENTS_QUEUE}" in out.notes

"""Upgrades and failures the chart must survive: per-pool update strategies (a full GPU pool still rolls),
worker PDBs, KEDA fallback, TLS to Redis (self-signed or private CA, client certificates), a KEDA trigger that
counts in-flight messages, images pinned by digest, a migration deadline inside Helm's timeout, and a worker
liveness probe that runs the heartbeat check."""

from __future__ import annotations

import pytest
import yaml

HELM_DEFAULT_TIMEOUT_S = 300  # `helm upgrade --timeout` default (5m)


def _deployment(chart, out, suffix):
    return out.get("Deployment", f"{chart.fullname}-{suffix}")


def _pod(doc):
    return doc["spec"]["template"]["spec"]


def _scaled_object(chart, out, pool):
    return out.get("ScaledObject", f"{chart.fullname}-worker-{pool}")["spec"]


# --- update strategies and PDBs -----------------------------------------------------------------------


def test_gpu_pool_rolls_without_a_spare_gpu_and_cpu_pool_surges(chart, rendered):
    out = rendered["gpu"]
    gpu = _deployment(chart, out, "worker-gpu")["spec"]["strategy"]
    assert gpu == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    cpu = _deployment(chart, out, "worker-cpu")["spec"]["strategy"]
    assert cpu == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    api = _deployment(chart, out, "api")["spec"]["strategy"]
    assert api == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}}


def test_each_strategy_follows_its_values(chart, rendered):
    assert _deployment(chart, rendered["keda-prometheus"], "api")["spec"]["strategy"]["rollingUpdate"] == {
        "maxUnavailable": 1, "maxSurge": 0,
    }
    out = chart.render("gpu", {"workers": {
        "gpu": {"strategy": {"type": "Recreate", "rollingUpdate": None}},  # null drops the default block
        "cpu": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%", "maxUnavailable": 1}}},
    }})
    assert _deployment(chart, out, "worker-gpu")["spec"]["strategy"] == {"type": "Recreate"}
    assert _deployment(chart, out, "worker-cpu")["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "50%", "maxUnavailable": 1}


def test_every_enabled_pool_has_a_pdb_selecting_only_its_pods(chart, rendered):
    out = rendered["gpu"]
    for pool in ("cpu", "gpu"):
        pdb = out.get("PodDisruptionBudget", f"{chart.fullname}-worker-{pool}")
        assert pdb["spec"]["maxUnavailable"] == 1
        labels = _deployment(chart, out, f"worker-{pool}")["spec"]["template"]["metadata"]["labels"]
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert all(labels.get(key) == value for key, value in selector.items())
        assert selector["app.kubernetes.io/component"] == f"worker-{pool}"
    assert rendered["default"].maybe("PodDisruptionBudget", f"{chart.fullname}-worker-gpu") is None  # pool off
    custom = rendered["keda-prometheus"]
    assert custom.maybe("PodDisruptionBudget", f"{chart.fullname}-worker-gpu") is None  # disabled in values
    assert custom.get("PodDisruptionBudget", f"{chart.fullname}-worker-cpu")


# --- KEDA: fallback, TLS, in-flight --------------------------------------------------------------------


def test_keda_fallback_defaults_and_overrides(chart, rendered):
    default = rendered["keda"]
    assert _scaled_object(chart, default, "cpu")["fallback"] == {"failureThreshold": 3, "replicas": 2}
    assert _scaled_object(chart, default, "gpu")["fallback"] == {"failureThreshold": 3, "replicas": 1}
    custom = rendered["keda-prometheus"]
    assert _scaled_object(chart, custom, "cpu")["fallback"] == {"failureThreshold": 5, "replicas": 4}
    off = chart.render("keda", {"workers": {"gpu": {"keda": {"fallback": {"enabled": False}}}}})
    assert "fallback" not in _scaled_object(chart, off, "gpu")


def test_keda_tls_options_for_a_rediss_broker(chart):
    out = chart.render("keda", {"keda": {"redis": {
        "unsafeSsl": True,
        "tls": {"secretName": "redis-tls", "caKey": "ca.crt", "certKey": "tls.crt", "keyKey": "tls.key",
                "keyPasswordKey": "tls.pass"},
    }}})
    trigger = _scaled_object(chart, out, "gpu")["triggers"][0]
    assert trigger["metadata"]["enableTLS"] == "true"  # rediss:// in the scenario's brokerUrl
    assert trigger["metadata"]["unsafeSsl"] == "true"
    auth = out.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "password": (chart.fullname, "REDIS_PASSWORD"),
        "ca": ("redis-tls", "ca.crt"), "cert": ("redis-tls", "tls.crt"), "key": ("redis-tls", "tls.key"),
        "keyPassword": ("redis-tls", "tls.pass"),
    }
    # Without a Secret name the CA comes from the release's Secret; a password-less Redis still gets it.
    ca_only = chart.render("keda", {
        "secrets": {"brokerUrl": "rediss://redis.cache:6380/0"}, "keda": {"redis": {"tls": {"caKey": "REDIS_CA"}}},
    })
    auth = ca_only.get("TriggerAuthentication", f"{chart.fullname}-redis")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "ca", "name": chart.fullname, "key": "REDIS_CA"}]
    assert "unsafeSsl" not in _scaled_object(chart, ca_only, "cpu")["triggers"][0]["metadata"]


def test_client_certificate_needs_its_key(chart):
    with pytest.raises(Exception, match="certKey and keda.redis.tls.keyKey go together"):
        chart.render("keda", {"keda": {"redis": {"tls": {"certKey": "tls.crt"}}}})


def test_prometheus_trigger_counts_waiting_and_in_flight(chart, rendered):
    out = rendered["keda-prometheus"]
    assert not out.of_kind("TriggerAuthentication")  # the Redis trigger's auth is not needed
    for pool, in_flight in {"cpu": 32 * 2, "gpu": 256 * 2}.items():  # batchSize x concurrency (threads pool)
        trigger = _scaled_object(chart, out, pool)["triggers"][0]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
        assert meta["query"] == 'sum(max by (state) (dfmod_queue_depth{queue="dfmod-classify"}))'
        list_length = {"cpu": 64, "gpu": 512}[pool]
        assert meta["threshold"] == str(in_flight + list_length)
    with pytest.raises(Exception, match="keda.prometheus.serverAddress"):
        chart.render("keda", {"keda": {"trigger": "prometheus"}})


# --- images, migrations, liveness -----------------------------------------------------------------------


def test_images_pinned_by_digest(chart, rendered):
    out = rendered["keda-prometheus"]
    top = "ghcr.io/dfmod/dfmod:0.1.0@sha256:" + "0123456789abcdef" * 4
    assert chart.container(_pod(_deployment(chart, out, "api")))["image"] == top
    assert chart.container(_pod(out.get("Job", f"{chart.fullname}-migrate")))["image"] == top
    assert chart.container(_pod(_deployment(chart, out, "worker-cpu")))["image"] == top
    # The CUDA image is another image: the top-level digest never lands on it.
    gpu = chart.container(_pod(_deployment(chart, out, "worker-gpu")))["image"]
    assert gpu == "ghcr.io/dfmod/dfmod:0.1.0-cuda@sha256:" + "fedcba9876543210" * 4
    unpinned = chart.render("keda-prometheus", {"workers": {"gpu": {"image": {"digest": ""}}}})
    assert chart.container(_pod(_deployment(chart, unpinned, "worker-gpu")))["image"] == "ghcr.io/dfmod/dfmod:0.1.0-cuda"
    assert "@" not in chart.container(_pod(_deployment(chart, rendered["default"], "api")))["image"]


def test_migration_job_gives_up_before_helms_default_timeout(chart, rendered):
    job = rendered["default"].get("Job", f"{chart.fullname}-migrate")
    assert job["spec"]["activeDeadlineSeconds"] < HELM_DEFAULT_TIMEOUT_S


def test_worker_liveness_runs_the_heartbeat_check_with_a_threshold_above_a_batch(chart, rendered):
    values = yaml.safe_load((chart.chart_dir / "values.yaml").read_text())
    for pool in ("cpu", "gpu"):
        ctr = chart.container(_pod(_deployment(chart, rendered["gpu"], f"worker-{pool}")))
        probe = ctr["livenessProbe"]
        command = probe["exec"]["command"]
        assert command[:3] == ["dfmod", "worker-alive", "--max-age"]
        max_age = float(command[3])
        # Far above a batch (a CPU batch of 32 takes well under a second, see docs/operations.md) and above
        # the heartbeat interval; the probe process itself gets time to start Python.
        assert max_age >= 60
        assert probe["timeoutSeconds"] >= 10
        assert max_age < values["workers"][pool]["terminationGracePeriodSeconds"] * 5


@pytest.mark.parametrize(
    "overrides,needle",
    [
        pytest.param({"workers": {"gpu": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "one"}}}}},
                     "maxSurge", id="strategy-bad-surge"),
        pytest.param({"workers": {"cpu": {"strategy": {"type": "Rolling"}}}}, "type", id="strategy-bad-type"),
        pytest.param({"api": {"strategy": {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}}}, "strategy",
                     id="recreate-with-rolling-update"),
        pytest.param({"workers": {"cpu": {"keda": {"fallback": {"replicas": -1}}}}}, "replicas", id="fallback-negative"),
        pytest.param({"workers": {"cpu": {"keda": {"fallback": {"replica": 1}}}}}, "replica", id="fallback-typo"),
        pytest.param({"keda": {"trigger": "rabbitmq"}}, "trigger", id="trigger-unknown"),
        pytest.param({"keda": {"redis": {"tls": {"caFile": "ca.crt"}}}}, "caFile", id="tls-typo"),
        pytest.param({"keda": {"redis": {"unsafeSsl": "yes"}}}, "unsafeSsl", id="unsafe-ssl-not-boolean"),
        pytest.param({"image": {"digest": "latest"}}, "digest", id="digest-not-sha256"),
        pytest.param({"workers": {"gpu": {"podDisruptionBudget": {"minAvailable": 1}}}}, "minAvailable",
                     id="pdb-unknown-key"),
    ],
)
def test_schema_rejects_bad_rollout_and_keda_values(chart, overrides, needle):
    with pytest.raises(Exception, match=needle):
        chart.render("keda", overrides)

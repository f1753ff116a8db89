"""Values the chart must refuse: schema violations and missing credentials fail rendering clearly."""

from __future__ import annotations

import helm_python as helm
import pytest

# (override, text the error must contain) - each applied on top of the valid default scenario.
SCHEMA_VIOLATIONS = [
    pytest.param({"workers": {"cpu": {"batchSize": "big"}}}, "batchSize", id="wrong-type-batch-size"),
    pytest.param({"workers": {"cpu": {"bogus": 1}}}, "bogus", id="unknown-key-in-workers-cpu"),
    pytest.param({"workers": {"gpu": {"gpuCount": 2}}}, "gpuCount", id="unknown-key-in-workers-gpu"),
    pytest.param({"workers": {"cpu": {"keda": {"listLenght": 10}}}}, "listLenght", id="typo-in-pool-keda"),
    pytest.param({"workers": {"gpu": {"device": "tpu"}}}, "device", id="device-not-in-enum"),
    pytest.param({"workers": {"cpu": {"pool": "prefork"}}}, "pool", id="celery-pool-not-in-enum"),
    pytest.param({"workers": {"cpu": {"batchSize": 0}}}, "batchSize", id="batch-size-below-one"),
    pytest.param({"workerz": {}}, "workerz", id="unknown-top-level-key"),
    pytest.param({"api": {"autoscaling": {"maxReplicas": "ten"}}}, "maxReplicas", id="wrong-type-api-hpa"),
    pytest.param({"keda": {"enabled": "yes"}}, "enabled", id="keda-enabled-not-boolean"),
    pytest.param({"keda": {"redis": {"address": "redis://redis:6379"}}}, "address", id="keda-address-not-host-port"),
    pytest.param({"secrets": {"brokerUrl": "amqp://guest@rabbit//"}}, "brokerUrl", id="broker-not-redis"),
    pytest.param({"secrets": {"databaseUrl": "sqlite:///x.db"}}, "databaseUrl", id="database-not-postgres"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="pull-policy-not-in-enum"),
    pytest.param({"config": {"storageUrl": "gs://bucket"}}, "storageUrl", id="storage-url-scheme"),
    pytest.param({"queue": ""}, "queue", id="empty-queue"),
]


@pytest.mark.parametrize(("override", "needle"), SCHEMA_VIOLATIONS)
def test_schema_rejects_bad_values(chart, override, needle):
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.render("default", override)
    assert needle in str(raised.value)


def test_schema_accepts_the_same_keys_with_good_values(chart):
    """Control for the rejections above: the keys themselves are fine with valid values."""
    out = chart.render(
        "default",
        {
            "workers": {"cpu": {"batchSize": 64, "device": "auto", "pool": "threads", "concurrency": 4}},
            "api": {"autoscaling": {"maxReplicas": 20}},
            "image": {"pullPolicy": "Always"},
            "queue": "dfmod-other",
        },
    )
    worker = out.get("Deployment", f"{chart.fullname}-worker-cpu")
    env = chart.env(chart.container(worker["spec"]["template"]["spec"]))
    assert env["DFMOD_BATCH_SIZE"] == "64"
    assert env["DFMOD_WORKER_POOL"] == "threads"
    assert env["DFMOD_WORKER_CONCURRENCY"] == "4"
    assert env["DFMOD_QUEUE"] == "dfmod-other"


def test_global_is_allowed_for_use_as_a_subchart(chart):
    chart.render("default", {"global": {"imageRegistry": "registry.example.com"}})


@pytest.mark.parametrize(
    ("values", "needles"),
    [
        pytest.param({}, ["secrets.databaseUrl", "secrets.existingSecret"], id="nothing-set"),
        pytest.param(
            {"secrets": {"brokerUrl": "redis://redis:6379/0"}},
            ["secrets.databaseUrl", "secrets.existingSecret"],
            id="database-missing",
        ),
        pytest.param(
            {"secrets": {"databaseUrl": "postgresql+psycopg://u:p@db/dfmod"}},
            ["secrets.brokerUrl", "secrets.existingSecret"],
            id="broker-missing",
        ),
        pytest.param(
            {"secrets": {"existingSecret": "creds"}, "keda": {"enabled": True}},
            ["keda.redis.address"],
            id="keda-without-redis-address",
        ),
        pytest.param(
            {
                "secrets": {"existingSecret": "creds"},
                "workers": {"cpu": {"enabled": False}, "gpu": {"enabled": False}},
            },
            ["worker pool"],
            id="no-worker-pool",
        ),
    ],
)
def test_missing_required_values_fail_with_a_clear_message(chart, values, needles):
    with pytest.raises(helm.HelmRenderError) as raised:
        chart.render(None, values)
    message = str(raised.value)
    for needle in needles:
        assert needle in message, message


def test_either_credential_source_is_enough(chart):
    """Controls for the failures above: URLs alone, or existingSecret alone, render."""
    chart.render(None, {"secrets": {"databaseUrl": "postgresql+psycopg://u:p@db/dfmod", "brokerUrl": "redis://r:6379/0"}})
    chart.render(None, {"secrets": {"existingSecret": "creds"}})


def test_no_secret_defaults(chart):
    secrets = chart.chart.values["secrets"]
    assert all(value in ("", {}) for value in secrets.values()), secrets

"""Every rendered manifest of every ci/ scenario is valid Kubernetes; CRD objects are checked by hand."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

# Custom resources: kubernetes-validate has no schemas for them; their structure is asserted below.
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas shipped.
KUBE_VERSIONS = ["1.25.0", f"{kubernetes_validate.latest_version()}.0"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_every_scenario_renders_the_core_objects(chart, rendered, scenario):
    out = rendered[scenario]
    kinds = {doc["kind"] for doc in out.docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Job", "Pod"} <= kinds, kinds
    out.get("Deployment", f"{chart.fullname}-api")
    assert out.notes.strip(), "NOTES.txt rendered empty"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(rendered, scenario, kube_version):
    out = rendered[scenario]
    validated = 0
    for doc in out.docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {kube_version}: {error.message}")
        validated += 1
    assert validated >= 8


def test_validation_catches_a_bad_manifest(rendered):
    """The validation above can fail: a misspelt field and a wrong type are rejected."""
    deployment = next(doc for doc in rendered["default"].docs if doc["kind"] == "Deployment")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBE_VERSIONS[0], strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBE_VERSIONS[0], strict=True)


def test_names_namespaces_and_labels(chart, rendered, scenario):
    out = rendered[scenario]
    seen = set()
    for doc in out.docs:
        meta = doc["metadata"]
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
        assert meta["namespace"] == chart.namespace, key
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == chart.release
        assert labels["app.kubernetes.io/name"] == "dfmod"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_selectors_match_pod_labels(rendered, scenario):
    out = rendered[scenario]
    for doc in out.of_kind("Deployment"):
        selector = doc["spec"]["selector"]["matchLabels"]
        pod_labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), doc["metadata"]["name"]
    deployments = out.of_kind("Deployment")
    for service in out.of_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, (service["metadata"]["name"], [d["metadata"]["name"] for d in matched])
        ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    for pdb in out.of_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments)


def test_autoscaler_targets_exist(rendered, scenario):
    out = rendered[scenario]
    deployments = {d["metadata"]["name"] for d in out.of_kind("Deployment")}
    targets = [hpa["spec"]["scaleTargetRef"] for hpa in out.of_kind("HorizontalPodAutoscaler")]
    targets += [so["spec"]["scaleTargetRef"] for so in out.of_kind("ScaledObject")]
    for ref in targets:
        assert ref.get("kind", "Deployment") == "Deployment"
        assert ref["name"] in deployments, ref
    names = [ref["name"] for ref in targets]
    assert len(names) == len(set(names)), f"two autoscalers on one Deployment: {names}"


def test_scaled_object_structure(chart, rendered, scenario):
    out = rendered[scenario]
    trigger_auths = {ta["metadata"]["name"]: ta for ta in out.of_kind("TriggerAuthentication")}
    for so in out.of_kind("ScaledObject"):
        spec = so["spec"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert set(spec) <= {
            "scaleTargetRef", "pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount",
            "advanced", "triggers", "idleReplicaCount", "fallback", "initialCooldownPeriod",
        }, set(spec)
        assert spec["scaleTargetRef"]["apiVersion"] == "apps/v1"
        for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert isinstance(spec[field], int) and spec[field] >= 0, field
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["maxReplicaCount"] >= 1
        assert len(spec["triggers"]) == 1
        trigger = spec["triggers"][0]
        metadata = trigger["metadata"]
        # KEDA trigger metadata is a map of strings.
        assert all(isinstance(value, str) for value in metadata.values()), metadata
        if "fallback" in spec:
            fallback = spec["fallback"]
            assert set(fallback) == {"failureThreshold", "replicas"}, fallback
            assert isinstance(fallback["failureThreshold"], int) and fallback["failureThreshold"] >= 1
            assert isinstance(fallback["replicas"], int) and fallback["replicas"] >= 0
        if trigger["type"] == "prometheus":
            assert {"serverAddress", "query", "threshold", "activationThreshold"} <= set(metadata)
            assert re.fullmatch(r"https?://\S+", metadata["serverAddress"])
            assert int(metadata["threshold"]) >= 1 and int(metadata["activationThreshold"]) >= 0
            assert "authenticationRef" not in trigger
            continue
        assert trigger["type"] == "redis"
        assert {"address", "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS"} <= set(metadata)
        assert re.fullmatch(r"[^:/\s]+:\d+", metadata["address"]), metadata["address"]
        assert int(metadata["listLength"]) >= 1 and int(metadata["activationListLength"]) >= 0
        assert metadata["enableTLS"] in {"true", "false"}
        assert metadata.get("unsafeSsl", "false") in {"true", "false"}
        assert metadata["databaseIndex"].isdigit()
        if "authenticationRef" in trigger:
            assert trigger["authenticationRef"]["name"] in trigger_auths
    for ta in trigger_auths.values():
        assert ta["apiVersion"] == "keda.sh/v1alpha1"
        refs = ta["spec"]["secretTargetRef"]
        parameters = [ref["parameter"] for ref in refs]
        # The redis scaler's authentication parameters: credentials and TLS material.
        assert set(parameters) <= {"password", "username", "ca", "cert", "key", "keyPassword"}
        assert len(parameters) == len(set(parameters))
        assert ("cert" in parameters) == ("key" in parameters)
        assert "username" not in parameters or "password" in parameters
        for ref in refs:
            assert ref["name"] and ref["key"]
            secret = out.maybe("Secret", ref["name"])
            if secret is not None:  # the chart's own Secret must hold the key; an existingSecret is external
                assert ref["key"] in secret["data"], (ref, list(secret["data"]))


def test_service_monitor_structure(chart, rendered, scenario):
    out = rendered[scenario]
    services = out.of_kind("Service")
    for sm in out.of_kind("ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        spec = sm["spec"]
        assert spec["namespaceSelector"]["matchNames"] == [chart.namespace]
        match_labels = spec["selector"].get("matchLabels", {})
        expressions = spec["selector"].get("matchExpressions", [])

        def selected(service, match_labels=match_labels, expressions=expressions):
            labels = service["metadata"]["labels"]
            if not match_labels.items() <= labels.items():
                return False
            return all(
                labels.get(expr["key"]) in expr["values"] for expr in expressions if expr["operator"] == "In"
            )

        chosen = [s for s in services if selected(s)]
        assert chosen, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for endpoint in spec["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
            for service in chosen:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]

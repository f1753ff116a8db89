"""What the chart must get right: probes, GPU scheduling, KEDA on the consumed queue, the migration hook,
existingSecret, security contexts, metrics."""

from __future__ import annotations

import pytest

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _deployment(chart, out, suffix):
    return out.get("Deployment", f"{chart.fullname}-{suffix}")


def _pod(doc):
    return doc["spec"]["template"]["spec"]


# --- API ---------------------------------------------------------------------------------------------


def test_api_runs_the_api_and_has_probes(chart, rendered):
    api = _deployment(chart, rendered["default"], "api")
    ctr = chart.container(_pod(api))
    assert ctr["command"] == ["dfmod"]
    assert ctr["args"][0] == "api" and "--port" in ctr["args"]
    port = int(ctr["args"][ctr["args"].index("--port") + 1])
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in ctr["ports"]
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert ctr["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_api_service_hpa_and_pdb(chart, rendered):
    out = rendered["default"]
    service = out.get("Service", f"{chart.fullname}-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = out.get("HorizontalPodAutoscaler", f"{chart.fullname}-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in _deployment(chart, out, "api")["spec"]  # the HPA owns the count
    assert out.get("PodDisruptionBudget", f"{chart.fullname}-api")["spec"]["maxUnavailable"] == 1
    fixed = chart.render("default", {"api": {"autoscaling": {"enabled": False}, "replicaCount": 3}})
    assert _deployment(chart, fixed, "api")["spec"]["replicas"] == 3
    assert fixed.maybe("HorizontalPodAutoscaler", f"{chart.fullname}-api") is None


def test_ingress_routes_to_the_api_service(chart, rendered):
    assert not rendered["default"].of_kind("Ingress")
    ingress = rendered["full"].get("Ingress", f"{chart.fullname}-api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{chart.fullname}-api", "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "dfmod-tls"


# --- worker pools --------------------------------------------------------------------------------------


def test_gpu_pool_requests_gpus_and_lands_on_gpu_nodes(chart, rendered):
    out = rendered["gpu"]
    gpu = _deployment(chart, out, "worker-gpu")
    pod = _pod(gpu)
    ctr = chart.container(pod)
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert ctr["resources"]["limits"]["memory"]  # the pool's own limits are kept alongside
    assert GPU_TOLERATION in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["runtimeClassName"] == "nvidia"
    env = chart.env(ctr)
    assert env["DFMOD_DEVICE"] == "cuda"
    assert env["DFMOD_BATCH_SIZE"] == "256"
    assert ctr["image"] == "ghcr.io/dfmod/dfmod:0.1.0-cuda"
    assert gpu["spec"]["replicas"] == 2

    cpu = _deployment(chart, out, "worker-cpu")
    cpu_pod = _pod(cpu)
    cpu_ctr = chart.container(cpu_pod)
    assert "nvidia.com/gpu" not in str(cpu_ctr["resources"])
    assert GPU_TOLERATION not in cpu_pod.get("tolerations", [])
    assert chart.env(cpu_ctr)["DFMOD_DEVICE"] == "cpu"
    assert cpu_ctr["image"] == "ghcr.io/dfmod/dfmod:0.1.0"


def test_gpu_count_and_images_follow_values(chart):
    out = chart.render(
        "gpu",
        {
            "image": {"tag": "1.2.3"},
            "workers": {"gpu": {"gpus": 2, "resources": {"limits": {"memory": None}}, "image": {"repository": "reg.example/dfmod-cuda"}}},
        },
    )
    ctr = chart.container(_pod(_deployment(chart, out, "worker-gpu")))
    assert ctr["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert ctr["image"] == "reg.example/dfmod-cuda:1.2.3-cuda"
    assert chart.container(_pod(_deployment(chart, out, "worker-cpu")))["image"] == "ghcr.io/dfmod/dfmod:1.2.3"
    explicit = chart.render("gpu", {"workers": {"gpu": {"image": {"tag": "cu124-nightly"}}}})
    assert chart.container(_pod(_deployment(chart, explicit, "worker-gpu")))["image"].endswith(":cu124-nightly")


def test_pools_are_enabled_independently(chart, rendered):
    names = {d["metadata"]["name"] for d in rendered["default"].of_kind("Deployment")}
    assert names == {f"{chart.fullname}-api", f"{chart.fullname}-worker-cpu", f"{chart.fullname}-worker-events"}
    gpu_only = chart.render("gpu", {"workers": {"cpu": {"enabled": False}, "events": {"enabled": False}}})
    names = {d["metadata"]["name"] for d in gpu_only.of_kind("Deployment")}
    assert names == {f"{chart.fullname}-api", f"{chart.fullname}-worker-gpu"}


def test_pool_settings_reach_the_worker_env(chart):
    out = chart.render(
        "gpu",
        {
            "workers": {
                "cpu": {"concurrency": 3, "pool": "threads", "batchSize": 16, "batchWaitMs": 20, "torchThreads": 3},
                "gpu": {"batchWaitMs": 80, "torchThreads": None, "metricsPort": 9300},
            }
        },
    )
    cpu = chart.env(chart.container(_pod(_deployment(chart, out, "worker-cpu"))))
    assert (cpu["DFMOD_WORKER_POOL"], cpu["DFMOD_WORKER_CONCURRENCY"]) == ("threads", "3")
    assert (cpu["DFMOD_BATCH_SIZE"], cpu["DFMOD_BATCH_WAIT_MS"]) == ("16", "20")
    assert cpu["DFMOD_TORCH_THREADS"] == cpu["OMP_NUM_THREADS"] == "3"
    gpu_ctr = chart.container(_pod(_deployment(chart, out, "worker-gpu")))
    gpu = chart.env(gpu_ctr)
    assert gpu["DFMOD_BATCH_WAIT_MS"] == "80"
    assert "DFMOD_TORCH_THREADS" not in gpu
    assert gpu["DFMOD_METRICS_PORT"] == "9300"
    assert {"name": "metrics", "containerPort": 9300, "protocol": "TCP"} in gpu_ctr["ports"]


def test_workers_shut_down_gracefully_with_exec_form(chart, rendered):
    for pool in ("cpu", "gpu", "events"):
        worker = _deployment(chart, rendered["gpu"], f"worker-{pool}")
        pod = _pod(worker)
        ctr = chart.container(pod)
        # Exec form, no shell: `dfmod worker` is PID 1 and receives SIGTERM (Celery warm shutdown).
        assert ctr["command"] == ["dfmod"] and ctr["args"][:2] == ["worker", "--queues"] and len(ctr["args"]) == 3
        assert pod["terminationGracePeriodSeconds"] >= 60
        # Liveness is the consuming loop's heartbeat (an exec probe), not /metrics served by its own thread.
        command = ctr["livenessProbe"]["exec"]["command"]
        assert command[:3] == ["dfmod", "worker-alive", "--max-age"] and float(command[3]) >= 60
        assert ctr["startupProbe"]["httpGet"]["port"] == "metrics"
        assert "preStop" not in str(ctr.get("lifecycle", {}))


# --- autoscaling -------------------------------------------------------------------------------------


def _scaled_objects_match_consumed_queues(chart, out, pools):
    for pool in pools:
        deployment = _deployment(chart, out, f"worker-{pool}")
        queue = chart.env(chart.container(_pod(deployment)))["DFMOD_QUEUE"]
        so = out.get("ScaledObject", f"{chart.fullname}-worker-{pool}")
        assert so["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert so["spec"]["triggers"][0]["metadata"]["listName"] == queue
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    return out


def test_keda_scaled_object_watches_the_queue_each_pool_consumes(chart, rendered):
    out = rendered["keda"]
    _scaled_objects_match_consumed_queues(chart, out, ["cpu", "gpu"])
    gpu = out.get("ScaledObject", f"{chart.fullname}-worker-gpu")["spec"]
    assert gpu["minReplicaCount"] == 0  # scale to zero
    assert gpu["triggers"][0]["metadata"]["listLength"] == "512"
    assert gpu["triggers"][0]["metadata"]["activationListLength"] == "1"
    meta = out.get("ScaledObject", f"{chart.fullname}-worker-cpu")["spec"]["triggers"][0]["metadata"]
    # Derived from brokerUrl rediss://:ci-only-redis@redis.example.internal:6380/2
    assert meta["address"] == "redis.example.internal:6380"
    assert meta["databaseIndex"] == "2"
    assert meta["enableTLS"] == "true"
    assert not [h for h in out.of_kind("HorizontalPodAutoscaler") if "worker" in h["metadata"]["name"]]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"queue": "moderation"}, id="shared-queue-renamed"),
        pytest.param({"workers": {"gpu": {"queue": "moderation-gpu"}}}, id="pool-own-queue"),
    ],
)
def test_keda_list_name_follows_queue_overrides(chart, overrides):
    out = chart.render("keda", overrides)
    _scaled_objects_match_consumed_queues(chart, out, ["cpu", "gpu"])
    queues = {
        pool: out.get("ScaledObject", f"{chart.fullname}-worker-{pool}")["spec"]["triggers"][0]["metadata"]["listName"]
        for pool in ("cpu", "gpu")
    }
    if "queue" in overrides:
        assert queues == {"cpu": "moderation", "gpu": "moderation"}
        assert out.get("ConfigMap", chart.fullname)["data"]["DFMOD_QUEUE"] == "moderation"  # the API publishes there
    else:
        assert queues == {"cpu": "dfmod-classify", "gpu": "moderation-gpu"}


def test_keda_authenticates_with_the_broker_password(chart, rendered):
    out = rendered["keda"]
    so = out.get("ScaledObject", f"{chart.fullname}-worker-cpu")
    auth = out.get("TriggerAuthentication", so["spec"]["triggers"][0]["authenticationRef"]["name"])
    ref = auth["spec"]["secretTargetRef"][0]
    assert ref["parameter"] == "password"
    assert ref["name"] == chart.fullname
    assert out.secret_data(chart.fullname)[ref["key"]] == "ci-only-redis"


def test_keda_uses_the_acl_user_of_the_broker_url(chart):
    out = chart.render("keda", {"secrets": {"brokerUrl": "redis://dfmod:s3cret@redis.cache:6379/0"}})
    auth = out.get("TriggerAuthentication", f"{chart.fullname}-redis")
    refs = {ref["parameter"]: ref["key"] for ref in auth["spec"]["secretTargetRef"]}
    data = out.secret_data(chart.fullname)
    assert (data[refs["username"]], data[refs["password"]]) == ("dfmod", "s3cret")


def test_keda_without_redis_password_renders_no_authentication(chart):
    out = chart.render("keda", {"secrets": {"brokerUrl": "redis://redis.cache:6379/1"}})
    assert not out.of_kind("TriggerAuthentication")
    trigger = out.get("ScaledObject", f"{chart.fullname}-worker-cpu")["spec"]["triggers"][0]
    assert "authenticationRef" not in trigger
    assert trigger["metadata"]["address"] == "redis.cache:6379"
    assert trigger["metadata"]["databaseIndex"] == "1"
    assert "REDIS_PASSWORD" not in out.secret_data(chart.fullname)


def test_keda_off_gives_each_pool_a_cpu_hpa(chart, rendered):
    out = rendered["hpa"]
    assert not out.of_kind("ScaledObject") and not out.of_kind("TriggerAuthentication")
    for pool, (low, high) in {"cpu": (2, 8), "gpu": (1, 2)}.items():
        hpa = out.get("HorizontalPodAutoscaler", f"{chart.fullname}-worker-{pool}")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"{chart.fullname}-worker-{pool}"
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (low, high)
        metric = hpa["spec"]["metrics"][0]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert "replicas" not in _deployment(chart, out, f"worker-{pool}")["spec"]
    # Without KEDA and without the pool HPA the replica count is fixed.
    default = rendered["default"]
    assert _deployment(chart, default, "worker-cpu")["spec"]["replicas"] == 1
    assert default.maybe("HorizontalPodAutoscaler", f"{chart.fullname}-worker-cpu") is None


# --- migrations hook ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario_name", ["default", "existing-secret"])
def test_migration_job_is_a_self_sufficient_pre_install_hook(chart, rendered, scenario_name):
    out = rendered[scenario_name]
    job = out.get("Job", f"{chart.fullname}-migrate")
    hooks = chart.hooks(job)
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert set(hooks["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    job_weight = int(hooks["helm.sh/hook-weight"])
    pod = _pod(job)
    ctr = chart.container(pod)
    assert ctr["command"] == ["dfmod"] and ctr["args"] == ["migrate"]
    assert pod["restartPolicy"] == "Never"

    # Everything the Job's pod references must exist when pre-install hooks run: a hook of lower weight,
    # or the externally managed existingSecret.
    existing = out and chart.scenario(scenario_name).get("secrets", {}).get("existingSecret")

    def available_before_job(kind, name):
        if kind == "Secret" and name == existing:
            return True
        doc = out.maybe(kind, name)
        assert doc is not None, f"the migration Job references a missing {kind} {name}"
        doc_hooks = chart.hooks(doc)
        return "pre-install" in doc_hooks.get("helm.sh/hook", "") and int(doc_hooks["helm.sh/hook-weight"]) < job_weight

    refs = [("ConfigMap", src["configMapRef"]["name"]) for src in ctr.get("envFrom", []) if "configMapRef" in src]
    refs += [("Secret", src["secretRef"]["name"]) for src in ctr.get("envFrom", []) if "secretRef" in src]
    refs += [
        ("Secret", item["valueFrom"]["secretKeyRef"]["name"])
        for item in ctr.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    ]
    refs.append(("ServiceAccount", pod["serviceAccountName"]))
    assert any(kind == "Secret" for kind, _ in refs)
    for kind, name in refs:
        assert available_before_job(kind, name), (kind, name)
    env = chart.env(ctr)
    assert env["DFMOD_DATABASE_URL"]["secretKeyRef"]["key"] == "DFMOD_DATABASE_URL"

    if not existing:
        hook_secret = out.secret_data(f"{chart.fullname}-migrate")
        assert hook_secret["DFMOD_DATABASE_URL"] == out.secret_data(chart.fullname)["DFMOD_DATABASE_URL"]
    assert out.get("ConfigMap", f"{chart.fullname}-migrate")["data"] == out.get("ConfigMap", chart.fullname)["data"]


def test_release_resources_are_not_hooks(chart, rendered):
    """The release's own ConfigMap/Secret/ServiceAccount stay ordinary resources (tracked, upgraded, deleted)."""
    out = rendered["default"]
    for kind in ("ConfigMap", "Secret", "ServiceAccount"):
        assert chart.hooks(out.get(kind, chart.fullname)) == {}


def test_migrations_can_be_disabled(chart):
    out = chart.render("default", {"migrations": {"enabled": False}})
    assert not out.of_kind("Job")
    assert out.maybe("Secret", f"{chart.fullname}-migrate") is None


def test_helm_test_pod_calls_readyz(chart, rendered):
    pod = rendered["default"].get("Pod", f"{chart.fullname}-test-readyz")
    assert chart.hooks(pod)["helm.sh/hook"] == "test"
    command = " ".join(chart.container(pod["spec"])["command"])
    assert f"http://{chart.fullname}-api.{chart.namespace}.svc:8000/readyz" in command
    assert pod["spec"]["restartPolicy"] == "Never"


# --- credentials ---------------------------------------------------------------------------------------


def test_chart_secret_holds_the_credentials(chart, rendered):
    out = rendered["gpu"]
    data = out.secret_data(chart.fullname)
    assert data["DFMOD_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert data["DFMOD_BROKER_URL"].startswith("redis://")
    assert data["DFMOD_S3_ACCESS_KEY_ID"] == "ci-access-key"
    assert data["DFMOD_S3_SECRET_ACCESS_KEY"] == "ci-secret-key"
    assert "DFMOD_S3_EVENT_TOKEN" not in data  # unset values are left out, not stored empty
    with_callbacks = chart.render("gpu", {"secrets": {"callbackSecret": "cb-secret"}})
    assert with_callbacks.secret_data(chart.fullname)["DFMOD_CALLBACK_SECRET"] == "cb-secret"
    config = out.get("ConfigMap", chart.fullname)["data"]
    assert not any("PASSWORD" in key or "SECRET" in key or "URL" in key and "DATABASE" in key for key in config)


def test_every_secret_the_service_reads_reaches_its_pods_from_the_secret(chart):
    secrets = {"callbackSecret": "cb-secret", "secretKey": "fernet-key", "s3EventToken": "event-token"}
    out = chart.render("gpu", {"secrets": secrets})
    data = out.secret_data(chart.fullname)
    served = {"DFMOD_CALLBACK_SECRET", "DFMOD_SECRET_KEY", "DFMOD_S3_EVENT_TOKEN", "DFMOD_DATABASE_URL", "DFMOD_BROKER_URL"}
    assert served <= set(data)
    workloads = [(doc, pod) for doc, pod in out.pod_specs() if doc["kind"] == "Deployment"]
    assert len(workloads) >= 2  # the API and at least one worker pool
    for doc, pod in workloads:
        env = chart.env(chart.container(pod, pod["containers"][0]["name"]))
        for key in served:
            # From the Secret by reference: the value itself is in no pod spec.
            assert env[key]["secretKeyRef"] == {"name": chart.fullname, "key": key, **({} if key in (
                "DFMOD_DATABASE_URL", "DFMOD_BROKER_URL") else {"optional": True})}, (doc["metadata"]["name"], key)
    # No secret in any ConfigMap, and one cannot be put there through config.extra.
    for config_map in out.of_kind("ConfigMap"):
        values = " ".join(str(value) for value in (config_map.get("data") or {}).values())
        assert not any(secret in values for secret in secrets.values())
    with pytest.raises(Exception, match="is a secret"):
        chart.render("gpu", {"config": {"extra": {"DFMOD_CALLBACK_SECRET": "in-a-configmap"}}})


def test_existing_secret_means_no_secret_and_references_by_name(chart, rendered):
    out = rendered["existing-secret"]
    assert out.of_kind("Secret") == [], "no Secret may be rendered with existingSecret (hooks included)"
    refs = []
    for _, pod in out.pod_specs():
        for ctr in pod["containers"]:
            for item in ctr.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append(ref["name"])
            refs += [src["secretRef"]["name"] for src in ctr.get("envFrom", []) if "secretRef" in src]
    assert refs and set(refs) == {"dfmod-credentials"}
    workloads = {doc["metadata"]["name"] for doc, _ in out.pod_specs() if doc["kind"] != "Pod"}
    assert workloads == {f"{chart.fullname}-{s}" for s in ("api", "worker-cpu", "worker-gpu", "worker-events", "migrate")}
    for auth in out.of_kind("TriggerAuthentication"):
        assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {"dfmod-credentials"}
    assert out.of_kind("TriggerAuthentication"), "KEDA reads REDIS_PASSWORD from the existing Secret"


# --- security -----------------------------------------------------------------------------------------


def test_every_pod_and_container_is_locked_down(chart, rendered, scenario):
    out = rendered[scenario]
    pods = list(out.pod_specs())
    assert len(pods) >= 4
    for doc, pod in pods:
        where = f"{scenario}: {doc['kind']}/{doc['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["serviceAccountName"], where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for ctr in pod["containers"] + pod.get("initContainers", []):
            csc = ctr["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["runAsNonRoot"] is True, where
            assert csc.get("privileged", False) is False, where
            assert "ALL" in csc["capabilities"]["drop"], where
            assert not csc["capabilities"].get("add"), where
            mounts = {m["mountPath"]: m["name"] for m in ctr.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be a writable emptyDir"
            assert "resources" in ctr and ctr["resources"].get("requests"), where
    for sa in out.of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_data_dir_is_a_writable_volume(chart, rendered):
    out = rendered["default"]
    data_dir = out.get("ConfigMap", chart.fullname)["data"]["DFMOD_DATA_DIR"]
    for doc, pod in out.pod_specs():
        if doc["kind"] == "Pod":
            continue  # the helm test Pod runs no dfmod process
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in chart.container(pod)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[data_dir]], doc["metadata"]["name"]


def test_network_policies(chart, rendered):
    assert not rendered["default"].of_kind("NetworkPolicy")
    out = rendered["full"]
    api = out.get("NetworkPolicy", f"{chart.fullname}-api")
    rule = api["spec"]["ingress"][0]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dfmod", "app.kubernetes.io/instance": chart.release}}} in peers
    assert any("namespaceSelector" in peer for peer in peers)
    workers = out.get("NetworkPolicy", f"{chart.fullname}-workers")
    assert workers["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert workers["spec"]["policyTypes"] == ["Ingress"]


# --- metrics -----------------------------------------------------------------------------------------


def test_prometheus_scrape_annotations_match_ports(chart, rendered):
    out = rendered["gpu"]
    for suffix, port_name in (("api", "http"), ("worker-cpu", "metrics"), ("worker-gpu", "metrics")):
        deployment = _deployment(chart, out, suffix)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        ctr = chart.container(_pod(deployment))
        port = next(p["containerPort"] for p in ctr["ports"] if p["name"] == port_name)
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"
        if suffix.startswith("worker"):
            assert chart.env(ctr)["DFMOD_METRICS_PORT"] == str(port)
    off = chart.render("default", {"metrics": {"podAnnotations": False}})
    annotations = _deployment(chart, off, "api")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations


def test_service_monitors_cover_api_and_workers(chart, rendered):
    assert not rendered["default"].of_kind("ServiceMonitor")
    out = rendered["full"]
    api = out.get("ServiceMonitor", f"{chart.fullname}-api")
    assert api["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert api["spec"]["endpoints"][0]["port"] == "http"
    workers = out.get("ServiceMonitor", f"{chart.fullname}-workers")
    assert workers["spec"]["endpoints"][0]["port"] == "metrics"
    for pool in ("cpu", "gpu"):
        service = out.get("Service", f"{chart.fullname}-worker-{pool}-metrics")
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"][0]["name"] == "metrics"


def test_config_map_carries_settings(chart, rendered):
    data = rendered["full"].get("ConfigMap", chart.fullname)["data"]
    assert data["DFMOD_STORAGE_URL"] == "s3://dfmod-uploads"
    assert data["DFMOD_ALLOWED_BUCKETS"] == "dfmod-incoming,partner-drop"
    assert data["DFMOD_CHECKPOINT"] == "/models/custom.safetensors"
    assert data["DFMOD_THRESHOLD"] == "0.7"
    assert data["DFMOD_MAX_ATTEMPTS"] == "7"
    assert all(isinstance(value, str) for value in data.values())
    default = rendered["default"].get("ConfigMap", chart.fullname)["data"]
    assert "DFMOD_S3_ENDPOINT_URL" not in default and "DFMOD_THRESHOLD" not in default

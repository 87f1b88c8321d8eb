"""deploy/kubernetes against the code it runs (settings, served paths, the drain) and KEDA's documents.

`make lint` validates the Kubernetes objects against Kubernetes' schemas (kubernetes-validate); these tests
check what a schema cannot: that the manifests agree with guardstream and with each other, and the KEDA
custom resources, which kubernetes-validate has no schema for."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from processor.gateway.app import build_app
from processor.gateway.auth import BearerAuth
from processor.gateway.settings import GatewaySettings
from processor.worker import serve as worker_serve
from processor.worker.http import HealthServer
from processor.worker.settings import WorkerSettings

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"

# KEDA's ScaledObject specification (keda.sh/docs/2.15/reference/scaledobject-spec): every field it
# documents under spec, scaleTargetRef and a trigger.
SCALED_OBJECT_SPEC_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
SCALE_TARGET_REF_FIELDS = {"apiVersion", "kind", "name", "envSourceContainerName"}
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
# KEDA's Apache Kafka scaler (keda.sh/docs/2.15/scalers/apache-kafka): its trigger metadata, and the
# parameters a TriggerAuthentication may supply.
KAFKA_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "version",
    "partitionLimitation",
    "sasl",
    "saslTokenProvider",
    "tls",
    "unsafeSsl",
    "awsRegion",
}
KAFKA_AUTH_PARAMETERS = {
    "sasl",
    "saslTokenProvider",
    "username",
    "password",
    "keytab",
    "realm",
    "kerberosConfig",
    "kerberosServiceName",
    "oauthTokenEndpointUri",
    "scopes",
    "oauthExtensions",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
    "awsRoleArn",
    "awsAccessKeyID",
    "awsSecretAccessKey",
}
KAFKA_SASL_MODES = {"plaintext", "scram_sha256", "scram_sha512", "gssapi", "oauthbearer", "none"}
# GUARDSTREAM_SASL_MECHANISM in KEDA's words.
KEDA_SASL_MODE = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}

# Each command's settings object and the environment prefix it reads.
SETTINGS_BY_COMMAND = {
    "worker": (WorkerSettings, "GUARDSTREAM_"),
    "gateway": (GatewaySettings, "GUARDSTREAM_GATEWAY_"),
}


def load_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in deploy/kubernetes, by (kind, name)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") != "Kustomization":
                objects[document["kind"], document["metadata"]["name"]] = document
    return objects


OBJECTS = load_objects()
# The Kubernetes version `make lint` validates against, read from the Makefile that sets it.
(KUBERNETES_VERSION,) = [
    line.split(":=")[1].strip()
    for line in (MANIFESTS.parents[1] / "Makefile").read_text().splitlines()
    if line.startswith("K8S_VERSION :=")
]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for (each, _), document in OBJECTS.items() if each == kind]


def container(deployment: str) -> dict[str, Any]:
    (only,) = OBJECTS["Deployment", deployment]["spec"]["template"]["spec"]["containers"]
    return only


def command(spec: dict[str, Any]) -> str:
    """`worker` or `gateway`: the guardstream subcommand a container runs."""
    return spec["args"][1]


def environment(spec: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment: its ConfigMaps' keys with their values, its own entries (secret
    references as None)."""
    names: dict[str, str | None] = {}
    for source in spec.get("envFrom", []):
        names.update(OBJECTS["ConfigMap", source["configMapRef"]["name"]]["data"])
    for entry in spec.get("env", []):
        names[entry["name"]] = entry.get("value")
    return names


def worker_setting(name: str) -> Any:
    """A worker setting as the manifests set it, else its default."""
    value = environment(container("guardstream-worker")).get(f"GUARDSTREAM_{name.upper()}")
    return value if value is not None else WorkerSettings.model_fields[name].default


def scaled_object() -> dict[str, Any]:
    (only,) = of_kind("ScaledObject")
    return only


def kafka_trigger() -> dict[str, Any]:
    (trigger,) = scaled_object()["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    return trigger


def test_the_kustomization_applies_every_manifest_but_the_optional_servicemonitor():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_every_env_var_the_manifests_set_is_a_real_setting():
    for deployment in of_kind("Deployment"):
        for spec in deployment["spec"]["template"]["spec"]["containers"]:
            settings, prefix = SETTINGS_BY_COMMAND[command(spec)]
            env = environment(spec)
            unknown = [
                name
                for name in env
                if not name.startswith(prefix) or name[len(prefix) :].lower() not in settings.model_fields
            ]
            assert not unknown, f"{deployment['metadata']['name']}: not {settings.__name__} fields: {unknown}"


def test_the_manifests_values_parse_as_settings():
    for name in ("guardstream-worker", "guardstream-gateway"):
        spec = container(name)
        settings_class, prefix = SETTINGS_BY_COMMAND[command(spec)]
        values = {key[len(prefix) :].lower(): value for key, value in environment(spec).items()}
        # A value from a Secret gets a placeholder: the test reads the manifests' settings, not secrets.
        settings = settings_class(
            **{key: "placeholder" if value is None else value for key, value in values.items()}
        )
        assert settings.security_protocol == "SASL_SSL"


def test_every_secret_reference_names_a_key_of_a_secret_in_the_manifests():
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        references = [
            (entry["valueFrom"]["secretKeyRef"]["name"], entry["valueFrom"]["secretKeyRef"]["key"])
            for spec in pod["containers"]
            for entry in spec.get("env", [])
            if "valueFrom" in entry
        ]
        references += [
            (volume["secret"]["secretName"], item["key"])
            for volume in pod.get("volumes", [])
            if "secret" in volume
            for item in volume["secret"].get("items", [])
        ]
        for secret, key in references:
            assert key in OBJECTS["Secret", secret]["stringData"], f"{secret} has no key {key}"
    for reference in of_kind("TriggerAuthentication")[0]["spec"]["secretTargetRef"]:
        assert reference["key"] in OBJECTS["Secret", reference["name"]]["stringData"]


def test_the_gateways_api_keys_setting_names_the_mounted_secret_file():
    spec = container("guardstream-gateway")
    pod = OBJECTS["Deployment", "guardstream-gateway"]["spec"]["template"]["spec"]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == "api-keys"]
    (mount,) = [mount for mount in spec["volumeMounts"] if mount["name"] == "api-keys"]
    (item,) = volume["secret"]["items"]
    assert environment(spec)["GUARDSTREAM_GATEWAY_API_KEYS"] == f"{mount['mountPath']}/{item['path']}"


def test_the_worker_asks_for_one_gpu():
    resources = container("guardstream-worker")["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1


def test_the_worker_deployment_leaves_its_replica_count_to_keda():
    assert "replicas" not in OBJECTS["Deployment", "guardstream-worker"]["spec"]
    target = scaled_object()["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert ("Deployment", target["name"]) in OBJECTS


def probes(spec: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Each probe's path and the container port it reaches (a named port resolved)."""
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    found = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = spec[probe]["httpGet"]
        found[probe] = (get["path"], ports[get["port"]] if isinstance(get["port"], str) else get["port"])
    return found


async def test_the_worker_probes_reach_paths_its_http_server_serves():
    spec = container("guardstream-worker")
    found = probes(spec)
    assert found["livenessProbe"][0] == "/healthz"
    assert found["readinessProbe"][0] == "/readyz"
    assert {port for _, port in found.values()} == {int(worker_setting("http_port"))}
    server = HealthServer(CollectorRegistry(), is_ready=lambda: True)
    port = await server.start(0)
    try:
        async with aiohttp.ClientSession() as session:
            for path, _ in found.values():
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status == 200, path
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
    finally:
        await server.stop()


def test_the_gateway_probes_reach_paths_the_gateway_serves():
    spec = container("guardstream-gateway")
    found = probes(spec)
    assert found["livenessProbe"][0] == "/healthz"
    assert found["readinessProbe"][0] == "/readyz"
    listen = GatewaySettings(listen=environment(spec)["GUARDSTREAM_GATEWAY_LISTEN"])
    assert {port for _, port in found.values()} == {listen.host_port[1]}
    app = build_app(SimpleNamespace(settings=GatewaySettings()), BearerAuth([]))
    served = {route.resource.canonical for route in app.router.routes() if route.method == "GET"}
    assert {path for path, _ in found.values()} <= served


def test_the_metrics_ports_are_named_for_a_servicemonitor():
    assert container("guardstream-worker")["ports"][0]["name"] == "metrics"
    service_ports = {port["name"] for service in of_kind("Service") for port in service["spec"]["ports"]}
    (monitor,) = of_kind("ServiceMonitor")
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= service_ports
    for service in of_kind("Service"):
        selected = service["spec"]["selector"]["app.kubernetes.io/name"]
        assert selected in monitor["spec"]["selector"]["matchExpressions"][0]["values"]


def test_the_worker_grace_period_outlasts_its_sigterm_drain():
    # The drain waits for the steps under way, at most --steps-in-flight; a worker that /healthz calls
    # healthy ends one at least every --stall-seconds while any is under way (processor/worker/health.py).
    drain_bound = int(worker_setting("steps_in_flight")) * float(worker_setting("stall_seconds"))
    grace = OBJECTS["Deployment", "guardstream-worker"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert grace > drain_bound


def test_the_gateway_grace_period_outlasts_its_prestop_and_http_shutdown():
    spec = container("guardstream-gateway")
    pre_stop = int(spec["lifecycle"]["preStop"]["exec"]["command"][1])
    shutdown = inspect.signature(web.BaseRunner.__init__).parameters["shutdown_timeout"].default
    grace = OBJECTS["Deployment", "guardstream-gateway"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert grace > pre_stop + shutdown


def test_the_scaled_object_uses_only_fields_keda_documents():
    so = scaled_object()
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC_FIELDS
    assert set(spec["scaleTargetRef"]) <= SCALE_TARGET_REF_FIELDS
    for trigger in spec["triggers"]:
        assert set(trigger) <= TRIGGER_FIELDS
    metadata = kafka_trigger()["metadata"]
    assert set(metadata) <= KAFKA_METADATA
    # KEDA's trigger metadata is a map of strings: an unquoted number or boolean is rejected.
    assert all(isinstance(value, str) for value in metadata.values()), metadata
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["offsetResetPolicy"] in {"latest", "earliest"}
    assert metadata["sasl"] in KAFKA_SASL_MODES
    assert metadata["tls"] in {"enable", "disable"}
    assert metadata["allowIdleConsumers"] == "false"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_the_scaled_objects_hpa_behavior_is_a_valid_kubernetes_hpa_behavior():
    # KEDA passes advanced.horizontalPodAutoscalerConfig.behavior to the HPA it creates as is.
    behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "guardstream-worker"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "guardstream-worker"},
            "maxReplicas": scaled_object()["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_the_trigger_authentication_supplies_only_kafka_auth_parameters():
    (auth,) = of_kind("TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert set(auth["spec"]) == {"secretTargetRef"}
    parameters = {reference["parameter"] for reference in auth["spec"]["secretTargetRef"]}
    assert parameters <= KAFKA_AUTH_PARAMETERS
    assert kafka_trigger()["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_the_scaled_object_watches_the_workers_brokers_group_and_token_topic():
    metadata = kafka_trigger()["metadata"]
    assert metadata["bootstrapServers"] == worker_setting("kafka_bootstrap")
    assert metadata["consumerGroup"] == worker_setting("group_id")
    assert metadata["topic"] == worker_setting("tokens_topic")
    # Lag of a partition with no committed offset counts as the worker's consumer would start it.
    assert 'auto_offset_reset="earliest"' in inspect.getsource(worker_serve.serve)
    assert metadata["offsetResetPolicy"] == "earliest"


def test_the_scaled_object_speaks_to_kafka_as_the_worker_does():
    metadata = kafka_trigger()["metadata"]
    protocol = worker_setting("security_protocol")
    assert metadata["tls"] == ("enable" if protocol in ("SSL", "SASL_SSL") else "disable")
    if protocol.startswith("SASL"):
        assert metadata["sasl"] == KEDA_SASL_MODE[worker_setting("sasl_mechanism")]
    else:
        assert metadata.get("sasl", "none") == "none"


@pytest.mark.parametrize("partitions", ["default", "manifests"])
def test_max_replicas_is_at_most_the_token_topics_partitions(partitions: str):
    # More consumers than partitions sit idle: each partition goes to one member of the group.
    bound = (
        WorkerSettings.model_fields["partitions"].default
        if partitions == "default"
        else int(worker_setting("partitions"))
    )
    assert scaled_object()["spec"]["maxReplicaCount"] <= bound

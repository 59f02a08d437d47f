"""The operator's render layer: a PromptPipeline's children, as pure manifests."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptpipe.contract.pipeline_file import parse_pipeline
from promptpipe.contract.runtime_config import BackendPods, RuntimeConfig
from promptpipe.contract.spec import STAGE_ORDER, CorpusSpec, StageName
from promptpipe.registry.settings import RegistrySettings
from promptpipe_operator import policy
from promptpipe_operator.render import (
    CORPUS_DIR,
    GRPC_PORT,
    TGI_PORT,
    child_name,
    children,
    config_map,
    deployment,
    identity_enforceable,
    network_policies,
    runtime_config,
    scaled_object,
    selector,
    service,
)
from promptpipe_operator.rollout import BLUE, GREEN, Slot, State
from promptpipe_operator.settings import OperatorSettings
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "examples" / "quickstart.yaml").read_text())
SETTINGS = OperatorSettings()
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def pipeline(
    name: str = "quickstart",
    with_model: dict[str, Any] | None = None,
    with_rag: dict[str, Any] | None = None,
    **stages: Any,
) -> Any:
    doc = copy.deepcopy(QUICKSTART)
    doc["metadata"]["name"] = name
    doc["spec"]["model"].update(with_model or {})
    doc["spec"]["rag"].update(with_rag or {})
    for stage, spec in stages.items():
        doc["spec"]["stages"].setdefault(stage, {}).update(spec)
    return parse_pipeline(doc)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def test_one_deployment_service_and_scaled_object_per_stage_and_one_config_map() -> None:
    out = children(pipeline(), "ns1", SETTINGS)
    # The runtime config, and the cluster's keys the stages check their callers' tokens with.
    assert set(by_kind(out, "ConfigMap")) == {"quickstart-config", "quickstart-identity"}
    for kind in ("Deployment", "Service", "ScaledObject", "ServiceAccount"):
        assert set(by_kind(out, kind)) == {f"quickstart-{s.value}" for s in STAGE_ORDER}
    assert all(m["metadata"]["namespace"] == "ns1" for m in out)


def test_names_stay_dns_labels_for_the_longest_pipeline_name() -> None:
    long = "p" * 63
    for m in children(pipeline(long), "ns1", SETTINGS):
        assert DNS_LABEL.match(m["metadata"]["name"]), m["metadata"]["name"]
    assert child_name(long, "inference").endswith("-inference")


def test_long_names_that_share_a_beginning_never_share_a_child() -> None:
    a, b = "p" * 55 + "-east", "p" * 55 + "-west"
    names_a = {m["metadata"]["name"] for m in children(pipeline(a), "ns1", SETTINGS)}
    names_b = {m["metadata"]["name"] for m in children(pipeline(b), "ns1", SETTINGS)}
    assert not names_a & names_b
    assert all(DNS_LABEL.match(n) for n in names_a | names_b)
    # A name that fits is kept as it is, as before: upgrading renames nothing.
    assert child_name("quickstart", "inference") == "quickstart-inference"


def test_services_select_exactly_their_stage_pods() -> None:
    out = children(pipeline(), "ns1", SETTINGS)
    deployments, services = by_kind(out, "Deployment"), by_kind(out, "Service")
    for name, svc in services.items():
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert deployments[name]["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
        others = [d for n, d in deployments.items() if n != name]
        assert not any(
            svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in others
        )


def test_runtime_config_points_each_stage_at_the_service_dns_names() -> None:
    cm, _ = config_map(pipeline(), "ns1")
    config = RuntimeConfig.model_validate(yaml.safe_load(cm["data"]["runtime.yaml"]))
    assert config.endpoints[StageName.RAG] == f"quickstart-rag.ns1.svc:{GRPC_PORT}"
    spec = pipeline().spec
    # The same pipeline, with the corpus where the rag pod mounts its ConfigMap.
    assert config.pipeline.spec == spec.model_copy(
        update={"rag": spec.rag.model_copy(update={"corpus": CorpusSpec(path=CORPUS_DIR)})}
    )


def test_deployment_probes_security_drain_and_config_rollout() -> None:
    pp = pipeline(inference={"drainGraceSeconds": 40})
    _, digest = config_map(pp, "ns1")
    d = deployment(pp, "ns1", StageName.INFERENCE, SETTINGS, digest)
    pod = d["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "replicas" not in d["spec"], "KEDA owns the replica count"
    assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT}
    # Liveness asks the service that is NOT_SERVING only while the stage is stuck (an open circuit is not).
    assert container["livenessProbe"]["grpc"] == {"port": GRPC_PORT, "service": "liveness"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert pod["automountServiceAccountToken"] is False, "no API token where nothing calls the API"
    assert {"name": "PROMPTPIPE_STAGE", "value": "inference"} in container["env"]
    changed = pipeline(inference={"timeoutSeconds": 10})
    assert config_map(changed, "ns1")[1] != digest, "a spec change rolls the pods"


def test_a_pod_is_given_the_time_its_calls_may_take_before_it_is_killed() -> None:
    for stage in StageName:
        # Unset, the drain lasts the stage's timeout: a call admitted just before SIGTERM can finish.
        pod = deployment(pipeline(), "ns1", stage, SETTINGS, "h")["spec"]["template"]["spec"]
        # The gateway's pre-stop wait (it keeps serving while the endpoints move) comes first.
        pre_stop = 5 if stage is StageName.STREAM else 0
        assert pod["terminationGracePeriodSeconds"] == pre_stop + 120 + 5, stage
    short = pipeline(post={"timeoutSeconds": 7.5})
    assert (
        deployment(short, "ns1", StageName.POST, SETTINGS, "h")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        == 8 + 5
    )


def test_scaled_object_scales_a_called_stage_on_the_calls_its_callers_have_open_to_it() -> None:
    pp = pipeline(
        rag={
            "queue": {"concurrency": 5},
            "scaling": {"minReplicas": 0, "maxReplicas": 7, "targetQueueDepth": 3, "cooldownSeconds": 20},
        }
    )
    so = scaled_object(pp, "ns1", StageName.RAG, SETTINGS)
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 7)
    assert spec["scaleTargetRef"]["name"] == "quickstart-rag"
    (trigger,) = spec["triggers"]
    # Counted at the callers: present (and waking rag) while rag has no pod; working calls count too.
    assert trigger["metadata"]["query"] == (
        'sum(rate(promptpipe_stage_next_call_seconds_total{namespace="ns1",pipeline="quickstart",to="rag"}[1m]))'
    )
    # A replica per (concurrency + targetQueueDepth) calls: added once every slot is busy and 3 wait on each.
    assert trigger["metadata"]["threshold"] == "8" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["activationThreshold"] == "0"
    assert spec["cooldownPeriod"] == 20
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 20
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_the_gateway_scales_on_its_own_calls_working_and_waiting() -> None:
    query = scaled_object(pipeline(), "ns1", StageName.STREAM, SETTINGS)["spec"]["triggers"][0]["metadata"]["query"]
    own = '{namespace="ns1",pipeline="quickstart",stage="stream"}'
    assert query == f"sum(promptpipe_stage_in_flight{own}) + sum(promptpipe_stage_queue_depth{own})"


def test_called_stages_have_headless_services_and_the_gateway_a_cluster_ip() -> None:
    pp = pipeline()
    for stage in StageName:
        spec = service(pp, "ns1", stage)["spec"]
        assert spec.get("clusterIP") == (None if stage is StageName.STREAM else "None"), stage


def test_only_the_gateway_serves_the_openai_http_api_on_its_named_port() -> None:
    pp = pipeline()
    for stage in StageName:
        container = deployment(pp, "ns1", stage, OperatorSettings(), "h")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        ports = {p["name"]: p for p in container["ports"]}
        service_ports = {p["name"]: p for p in service(pp, "ns1", stage)["spec"]["ports"]}
        if stage is StageName.STREAM:
            assert env["PROMPTPIPE_HTTP_PORT"] == str(ports["http"]["containerPort"])
            assert service_ports["http"]["targetPort"] == "http"
        else:
            assert "PROMPTPIPE_HTTP_PORT" not in env and "http" not in ports and "http" not in service_ports


def test_managed_tgi_is_a_gpu_deployment_behind_the_service_the_inference_stage_calls() -> None:
    pp = pipeline(
        with_model={
            "name": "Qwen/Qwen2.5-7B-Instruct",
            "backend": "tgi",
            "tgi": {"gpus": 2, "maxConcurrentRequests": 64, "maxInputTokens": 4000, "quantize": "awq"},
        }
    )
    out = children(pp, "ns1", SETTINGS, State(active=Slot("Qwen/Qwen2.5-7B-Instruct", BLUE)))
    assert "quickstart-backend-green" not in by_kind(out, "Deployment")
    tgi = by_kind(out, "Deployment")["quickstart-backend-blue"]
    pod = tgi["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--model-id") + 1] == "Qwen/Qwen2.5-7B-Instruct"
    assert args[args.index("--max-concurrent-requests") + 1] == "64"
    assert args[args.index("--usage-stats") + 1] == "off"  # TGI reports usage to Hugging Face by default
    assert args[args.index("--max-input-tokens") + 1] == "4000"
    assert args[args.index("--quantize") + 1] == "awq" and args[args.index("--num-shard") + 1] == "2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["automountServiceAccountToken"] is False
    svc = by_kind(out, "Service")["quickstart-backend"]
    assert svc["spec"]["selector"].items() <= tgi["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"]["promptpipe.io/color"] == "blue"
    config = runtime_config(pp, "ns1")
    model = config.pipeline.spec.model
    assert model.tgi is not None and model.tgi.endpoints == [f"http://quickstart-backend.ns1.svc:{TGI_PORT}"]
    # The inference stage routes over the pods behind that Service, found from its EndpointSlices.
    assert config.backend_pods == BackendPods(service="quickstart-backend", namespace="ns1", port="http")
    assert svc["spec"]["ports"][0]["name"] == config.backend_pods.port
    inference = by_kind(out, "Deployment")["quickstart-inference"]["spec"]["template"]["spec"]
    assert inference["serviceAccountName"] == "quickstart-inference"  # its identity, with the Role bound
    assert inference["automountServiceAccountToken"] is True
    role = by_kind(out, "Role")["quickstart-inference-discovery"]
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
    ]
    binding = by_kind(out, "RoleBinding")["quickstart-inference-discovery"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "quickstart-inference", "namespace": "ns1"}]


def test_a_registry_model_is_fetched_and_verified_by_an_init_container_before_tgi_starts() -> None:
    pp = pipeline(with_model={"name": "smollm2", "version": "v2", "backend": "tgi"})
    registry = RegistrySettings(bucket="models", table="models-table", region="eu-west-1")
    settings = OperatorSettings(registry_secret="registry-keys", backend_service_account="tgi")
    state = State(active=Slot("v1", BLUE), target=Slot("v2", GREEN, "sha256:22"), phase="Progressing")
    assert State.from_status(state.to_status()) == state
    out = children(pp, "ns1", settings, state, registry)
    deployments = by_kind(out, "Deployment")
    for color, version in (("blue", "v1"), ("green", "v2")):
        pod = deployments[f"quickstart-backend-{color}"]["spec"]["template"]["spec"]
        fetch = pod["initContainers"][0]
        assert fetch["command"][:5] == ["promptpipe", "model", "pull", f"smollm2:{version}", "/models/model"]
        assert fetch["command"][5:] == (["--digest", "sha256:22"] if version == "v2" else [])
        assert {"name": "PROMPTPIPE_REGISTRY_BUCKET", "value": "models"} in fetch["env"]
        assert {"name": "PROMPTPIPE_REGISTRY_REGION", "value": "eu-west-1"} in fetch["env"]
        # The AWS keys of the Secret, one by one: nothing else it holds becomes the container's environment.
        assert "envFrom" not in fetch
        from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in fetch["env"] if "valueFrom" in e}
        assert from_secret == {
            key: {"name": "registry-keys", "key": key, "optional": True}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        }
        # TGI gets a memory limit though the pipeline names none.
        assert pod["containers"][0]["resources"]["limits"]["memory"] == "16Gi"
        # Why the download failed shows in the pod's status, not only in its logs.
        assert fetch["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert pod["serviceAccountName"] == "tgi", "the pods' identity reads the registry (IRSA)"
        tgi = pod["containers"][0]
        assert tgi["args"][tgi["args"].index("--model-id") + 1] == "/models/model"
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in tgi["volumeMounts"]
    services = by_kind(out, "Service")
    # Traffic stays on the active color while green comes up; each color has its own Service for the smoke test.
    assert services["quickstart-backend"]["spec"]["selector"]["promptpipe.io/color"] == "blue"
    assert services["quickstart-backend-green"]["spec"]["selector"]["promptpipe.io/color"] == "green"
    assert out[0]["metadata"]["name"] == "quickstart-backend", "the switch is applied first"
    default = by_kind(children(pp, "ns1", SETTINGS, state, registry), "Deployment")["quickstart-backend-blue"]
    assert "serviceAccountName" not in default["spec"]["template"]["spec"]


def test_every_scratch_and_model_volume_has_a_size_limit() -> None:
    pp = pipeline(with_model={"name": "smollm2", "version": "v2", "backend": "tgi", "tgi": {"modelStorage": "30Gi"}})
    registry = RegistrySettings(bucket="models", table="models-table", region="eu-west-1")
    out = children(pp, "ns1", SETTINGS, State(active=Slot("v2", BLUE)), registry)
    limits = {}
    for name, d in by_kind(out, "Deployment").items():
        for volume in d["spec"]["template"]["spec"]["volumes"]:
            if "emptyDir" in volume:
                limits[f"{name}/{volume['name']}"] = volume["emptyDir"].get("sizeLimit")
    assert None not in limits.values(), limits
    assert limits["quickstart-backend-blue/models"] == limits["quickstart-backend-blue/data"] == "30Gi"
    assert limits["quickstart-rag/tmp"] == "256Mi"


def test_tgi_at_given_endpoints_and_other_backends_add_no_backend_children() -> None:
    for model in (
        {"backend": "tgi", "tgi": {"endpoints": ["http://tgi.example:80"]}},
        {"backend": "llamacpp"},
        {"backend": "openai", "openai": {"endpoints": ["http://vllm:8000/v1"]}},
    ):
        pp = pipeline(with_model=model)
        out = children(pp, "ns1", SETTINGS)
        names = {m["metadata"]["name"] for m in out}
        assert "quickstart-backend" not in names, model
        assert not {"Role", "RoleBinding"} & {m["kind"] for m in out}, model
        assert runtime_config(pp, "ns1").backend_pods is None, "the endpoints given are the replicas"
        inference = by_kind(out, "Deployment")["quickstart-inference"]["spec"]["template"]["spec"]
        assert inference["automountServiceAccountToken"] is False


def test_openai_key_comes_from_the_named_secret() -> None:
    pp = pipeline(
        with_model={
            "backend": "openai",
            "openai": {"endpoints": ["http://vllm:8000/v1"], "apiKeySecret": {"name": "llm-key", "key": "token"}},
        }
    )
    container = deployment(pp, "ns1", StageName.INFERENCE, SETTINGS, "h")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "token"}}} in container[
        "env"
    ]
    openai = runtime_config(pp, "ns1").pipeline.spec.model.openai
    assert openai is not None and openai.api_key_env == "OPENAI_API_KEY"


def with_auth(auth: dict[str, Any]) -> Any:
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["auth"] = auth
    return parse_pipeline(doc)


def gateway_pod(pp: Any) -> dict[str, Any]:
    spec: dict[str, Any] = deployment(pp, "ns1", StageName.STREAM, SETTINGS, "h")["spec"]["template"]["spec"]
    return spec


def test_the_gateways_api_keys_secret_is_a_volume_it_rereads_and_only_the_gateway_mounts_it() -> None:
    pp = with_auth({"apiKeysSecret": {"name": "team-keys", "key": "keys.yaml"}})
    pod = gateway_pod(pp)
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    # A volume, not an env var or a subPath: only a mounted Secret's files change when the Secret does.
    assert volume["secret"] == {
        "secretName": "team-keys",
        "items": [{"key": "keys.yaml", "path": "keys.yaml"}],
        "defaultMode": 0o440,
    }
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] and "subPath" not in mount
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROMPTPIPE_API_KEYS_FILE"] == f"{mount['mountPath']}/keys.yaml"
    assert "PROMPTPIPE_REQUIRE_API_KEYS" not in env
    for stage in (StageName.RAG, StageName.ASSEMBLE, StageName.INFERENCE, StageName.POST):
        other = deployment(pp, "ns1", stage, SETTINGS, "h")["spec"]["template"]["spec"]
        assert all(v["name"] != "api-keys" for v in other["volumes"])
        assert all(e["name"] != "PROMPTPIPE_API_KEYS_FILE" for e in other["containers"][0]["env"])


def test_without_keys_a_clusters_gateway_is_closed_unless_the_pipeline_says_open() -> None:
    closed = {e["name"]: e.get("value") for e in gateway_pod(with_auth({}))["containers"][0]["env"]}
    assert closed["PROMPTPIPE_REQUIRE_API_KEYS"] == "true"
    opened = {e["name"] for e in gateway_pod(with_auth({"open": True}))["containers"][0]["env"]}
    assert "PROMPTPIPE_REQUIRE_API_KEYS" not in opened and "PROMPTPIPE_API_KEYS_FILE" not in opened


def test_the_shared_quota_store_url_reaches_the_gateway_only_from_its_secret_never_in_the_manifest() -> None:
    store = {"urlSecret": {"name": "quota-store", "key": "url"}, "onUnreachable": "closed"}
    pp = with_auth({"open": True, "quotaStore": store})
    (container,) = gateway_pod(pp)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PROMPTPIPE_QUOTA_STORE_URL"] == {
        "name": "PROMPTPIPE_QUOTA_STORE_URL",
        "valueFrom": {"secretKeyRef": {"name": "quota-store", "key": "url"}},
    }
    # What to do without the store travels in the runtime config, with the limits themselves.
    config = runtime_config(pp, "ns1").pipeline.spec.auth.quota_store
    assert config is not None and config.on_unreachable == "closed"
    for stage in (StageName.RAG, StageName.ASSEMBLE, StageName.INFERENCE, StageName.POST):
        other = deployment(pp, "ns1", stage, SETTINGS, "h")["spec"]["template"]["spec"]["containers"][0]
        assert all(e["name"] != "PROMPTPIPE_QUOTA_STORE_URL" for e in other["env"])
    # Without one, each gateway pod keeps its own buckets: nothing to pass.
    (alone,) = gateway_pod(with_auth({"open": True}))["containers"]
    assert all(e["name"] != "PROMPTPIPE_QUOTA_STORE_URL" for e in alone["env"])


def test_corpus_config_map_is_mounted_for_rag_only_and_the_config_points_at_it() -> None:
    pp = pipeline(with_rag={"corpus": {"configMap": "docs"}})
    rag = deployment(pp, "ns1", StageName.RAG, SETTINGS, "h")["spec"]["template"]["spec"]
    assert {"name": "corpus", "configMap": {"name": "docs"}} in rag["volumes"]
    assert {"name": "corpus", "mountPath": CORPUS_DIR, "readOnly": True} in rag["containers"][0]["volumeMounts"]
    post = deployment(pp, "ns1", StageName.POST, SETTINGS, "h")["spec"]["template"]["spec"]
    assert all(v["name"] != "corpus" for v in post["volumes"])
    assert runtime_config(pp, "ns1").pipeline.spec.rag.corpus.path == CORPUS_DIR


def test_stage_resources_come_from_the_spec_else_from_what_the_stage_runs() -> None:
    pp = pipeline(post={"resources": {"requests": {"cpu": 2}, "limits": {"memory": "1Gi"}}})

    def resources(stage: StageName) -> Any:
        return deployment(pp, "ns1", stage, SETTINGS, "h")["spec"]["template"]["spec"]["containers"][0]["resources"]

    assert resources(StageName.POST) == {"requests": {"cpu": "2"}, "limits": {"memory": "1Gi"}}
    assert resources(StageName.INFERENCE)["requests"]["memory"] == "1Gi", "llama.cpp holds the model in memory"
    assert resources(StageName.RAG)["requests"]["cpu"] == "100m"


def test_spec_tracing_reaches_every_stage_in_its_config_and_a_change_rolls_them() -> None:
    doc = copy.deepcopy(QUICKSTART)
    untraced = config_map(parse_pipeline(doc), "ns1")[1]
    doc["spec"]["tracing"] = {"otlpEndpoint": "http://jaeger-collector.obs.svc:4317", "sampleRatio": 0.1}
    cm, traced = config_map(parse_pipeline(doc), "ns1")
    config = RuntimeConfig.model_validate(yaml.safe_load(cm["data"]["runtime.yaml"]))
    assert config.pipeline.spec.tracing is not None
    assert config.pipeline.spec.tracing.otlp_endpoint == "http://jaeger-collector.obs.svc:4317"
    assert config.pipeline.spec.tracing.sample_ratio == 0.1
    assert traced != untraced, "turning tracing on rolls the stage pods, which read it at start"


def test_config_hash_ignores_kubernetes_metadata_so_status_writes_roll_nothing() -> None:
    doc = copy.deepcopy(QUICKSTART)
    first = config_map(parse_pipeline(doc), "ns1")[1]
    doc["metadata"] |= {"resourceVersion": "42", "uid": "u-1", "generation": 3, "annotations": {"a": "b"}}
    doc["status"] = {"phase": "Ready"}
    assert config_map(parse_pipeline(doc), "ns1")[1] == first


@pytest.mark.controlplane
def test_every_child_is_accepted_by_the_api_server_and_kedas_crd(
    control_plane: ControlPlane, kube_tools: Tools, namespace: str
) -> None:
    both_colors = State(active=Slot("v1", BLUE), target=Slot("v2", GREEN), phase="Progressing")
    for pp, state, extra in (
        (pipeline(), None, 0),
        (pipeline("scale-to-zero", post={"scaling": {"minReplicas": 0, "maxReplicas": 2}}), None, 0),
        (
            pipeline(
                "gpu",
                with_model={"backend": "tgi", "tgi": {"gpus": 1}},
                with_rag={"corpus": {"configMap": "d"}},
                inference={"resources": {"limits": {"cpu": "500m"}}},
            ),
            State(active=Slot("m", BLUE)),
            3 + 2 + 1,  # TGI's Service, blue's Deployment and Service; the inference stage's Role and binding;
            # the TGI pods' NetworkPolicy
        ),
        (pipeline("bg", with_model={"name": "smollm2", "version": "v2", "backend": "tgi"}), both_colors, 5 + 2 + 1),
    ):
        manifests = yaml.safe_dump_all(children(pp, namespace, SETTINGS, state, RegistrySettings(), KEYS))
        result = subprocess.run(
            [
                str(kube_tools.kubectl),
                f"--kubeconfig={control_plane.kubeconfig}",
                "apply",
                "--dry-run=server",
                "-f",
                "-",
            ],
            input=manifests,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        # The config and identity ConfigMaps; per stage a Deployment, Service, ScaledObject, NetworkPolicy,
        # ServiceAccount and PodDisruptionBudget (up to 4 replicas by default).
        assert result.stdout.count("(server dry run)") == 2 + 6 * len(STAGE_ORDER) + extra


@pytest.mark.parametrize(
    ("image", "allowed", "ok"),
    [
        (
            "ghcr.io/huggingface/text-generation-inference:3.3.5",
            ["ghcr.io/huggingface/text-generation-inference"],
            True,
        ),
        (
            "ghcr.io/huggingface/text-generation-inference@sha256:ab",
            ["ghcr.io/huggingface/text-generation-inference"],
            True,
        ),
        (
            "ghcr.io/huggingface/text-generation-inference-evil:1",
            ["ghcr.io/huggingface/text-generation-inference"],
            False,
        ),
        ("registry:5000/team/tgi:2", ["registry:5000/team/"], True),
        ("registry:5000/other/tgi:2", ["registry:5000/team/"], False),
        ("evil.example/miner:latest", ["ghcr.io/huggingface/text-generation-inference"], False),
    ],
)
def test_tgi_images_come_only_from_allowed_repositories(image: str, allowed: list[str], ok: bool) -> None:
    assert policy.image_allowed(image, allowed) is ok


def test_the_operator_refuses_what_its_installer_did_not_allow_naming_the_field() -> None:
    tgi = pipeline(with_model={"name": "m", "backend": "tgi", "tgi": {"image": "evil.example/miner:latest"}})
    assert (policy.refusal(tgi, SETTINGS) or "").startswith("spec.model.tgi.image: evil.example/miner is not")
    at_endpoints = pipeline(with_model={"name": "m", "backend": "tgi", "tgi": {"endpoints": ["http://tgi"]}})
    assert policy.refusal(at_endpoints, SETTINGS) is None, "TGI the user runs is not the operator's to judge"
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["rollout"] = {"analysis": {"prometheus": {"url": "http://169.254.169.254/"}}}
    elsewhere = parse_pipeline(doc)
    assert (policy.refusal(elsewhere, SETTINGS) or "").startswith("spec.rollout.analysis.prometheus.url: ")
    named = OperatorSettings(analysis_prometheus_urls=["http://169.254.169.254"])
    assert policy.refusal(elsewhere, named) is None
    doc["spec"]["rollout"]["analysis"]["prometheus"]["url"] = SETTINGS.prometheus_address + "/"
    assert policy.refusal(parse_pipeline(doc), SETTINGS) is None, "the operator's own Prometheus always may"


def fused(*stages: str) -> Any:
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["fuse"] = list(stages)
    doc["spec"]["stages"]["post"] = {"queue": {"concurrency": 9}, "timeoutSeconds": 300}
    return parse_pipeline(doc)


def test_fused_stages_get_no_pods_and_are_reached_at_their_hosts_services() -> None:
    pp = fused("rag", "assemble", "post")
    out = children(pp, "ns1", SETTINGS)
    for kind in ("Deployment", "Service", "ScaledObject"):
        assert set(by_kind(out, kind)) == {"quickstart-stream", "quickstart-inference"}, kind
    config = RuntimeConfig.model_validate(yaml.safe_load(config_map(pp, "ns1")[0]["data"]["runtime.yaml"]))
    assert config.endpoints[StageName.RAG] == config.endpoints[StageName.ASSEMBLE] == config.endpoints[StageName.STREAM]
    assert config.endpoints[StageName.POST] == f"quickstart-inference.ns1.svc:{GRPC_PORT}"
    assert config.pipeline.spec.fuse == pp.spec.fuse, "the stage processes read what to host from the config"
    # rag reads its corpus in the gateway's pod now.
    gateway = by_kind(out, "Deployment")["quickstart-stream"]["spec"]["template"]["spec"]
    assert {"name": "corpus", "configMap": {"name": "quickstart-corpus"}} in gateway["volumes"]
    # The inference pod serves post's calls: it drains for post's timeout, scales on the gateway's open
    # calls to post, a replica per post's concurrency (+ the target queue depth).
    inference = by_kind(out, "Deployment")["quickstart-inference"]["spec"]["template"]["spec"]
    assert inference["terminationGracePeriodSeconds"] == 300 + 5
    (trigger,) = by_kind(out, "ScaledObject")["quickstart-inference"]["spec"]["triggers"]
    assert 'to="post"' in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == str(9 + 8)  # the default targetQueueDepth


def test_a_fused_pipelines_network_policies_let_each_pod_be_called_by_its_callers_host_only() -> None:
    policies = by_kind(network_policies(fused("post"), "ns1", SETTINGS), "NetworkPolicy")
    assert "quickstart-post-network" not in policies
    inference = policies["quickstart-inference-network"]["spec"]["ingress"][0]["from"]
    assert inference == [{"podSelector": {"matchLabels": selector("quickstart", "stream")}}]
    unfused = by_kind(network_policies(pipeline(), "ns1", SETTINGS), "NetworkPolicy")
    assert unfused["quickstart-inference-network"]["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": selector("quickstart", "post")}}
    ]


def test_fused_whole_the_pipeline_is_one_gateway_pod_that_holds_the_model_and_finds_the_tgi_pods() -> None:
    pp = fused("rag", "assemble", "post", "inference")
    out = children(pp, "ns1", SETTINGS)
    assert set(by_kind(out, "Deployment")) == {"quickstart-stream"}
    pod = by_kind(out, "Deployment")["quickstart-stream"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # It loads llama.cpp's model: the inference stage's resources and startup allowance.
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert container["startupProbe"]["failureThreshold"] == 120
    # With the operator's TGI it is the gateway's pod that watches the TGI pods and may call them.
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["fuse"] = ["post", "inference"]
    doc["spec"]["model"].update({"backend": "tgi", "tgi": {"gpus": 1}})
    tgi = parse_pipeline(doc)
    gateway = by_kind(children(tgi, "ns1", SETTINGS), "Deployment")["quickstart-stream"]["spec"]["template"]["spec"]
    assert gateway["serviceAccountName"] == "quickstart-stream"
    binding = by_kind(children(tgi, "ns1", SETTINGS), "RoleBinding")["quickstart-inference-discovery"]
    assert binding["subjects"][0]["name"] == "quickstart-stream"
    policies = by_kind(network_policies(tgi, "ns1", SETTINGS), "NetworkPolicy")
    backend = policies["quickstart-backend-network"]["spec"]["ingress"][0]["from"]
    # inference runs in the gateway's pod; assemble, in its own, asks TGI's /tokenize.
    assert backend == [{"podSelector": {"matchLabels": selector("quickstart", c)}} for c in ("stream", "assemble")]


def test_a_stages_resources_go_on_its_pod_and_never_into_the_config_its_process_reads() -> None:
    pp = pipeline(
        with_model={"backend": "tgi", "tgi": {"endpoints": ["http://tgi:8080"]}},
        post={"resources": {"requests": {"cpu": "2500m"}}},
    )
    config = RuntimeConfig.model_validate(yaml.safe_load(config_map(pp, "ns1")[0]["data"]["runtime.yaml"]))
    stages = config.pipeline.spec.stages
    assert all(stages.get(s).resources is None for s in STAGE_ORDER), "the stages never see their resources"
    post = by_kind(children(pp, "ns1", SETTINGS), "Deployment")["quickstart-post"]["spec"]["template"]["spec"]
    assert post["containers"][0]["resources"]["requests"]["cpu"] == "2500m"


@pytest.mark.parametrize(
    ("field", "path", "ok"),
    [
        ("corpus", "/var/run/secrets/kubernetes.io/serviceaccount", False),
        ("corpus", "docs/../../proc/self", False),
        ("corpus", "docs/..", False),
        ("corpus", "docs/2024..2025", True),
        ("corpus", "corpus", True),
        ("model", "/etc/shadow", False),
        ("model", "models/smollm2.gguf", True),
    ],
)
def test_a_path_read_inside_the_stage_container_stays_in_its_working_directory(field: str, path: str, ok: bool) -> None:
    doc = copy.deepcopy(QUICKSTART)
    if field == "corpus":
        doc["spec"]["rag"]["corpus"] = {"path": path}
    else:
        doc["spec"]["model"]["llamacpp"] = {"modelPath": path}
    named = "spec.rag.corpus.path" if field == "corpus" else "spec.model.llamacpp.modelPath"
    refusal = policy.refusal(parse_pipeline(doc), SETTINGS)
    assert refusal is None if ok else (refusal or "").startswith(f"{named}: must be relative"), refusal


@pytest.mark.parametrize(
    ("resources", "limit"),
    [
        (None, "16Gi"),
        ({"requests": {"memory": "24Gi"}}, "24Gi"),
        ({"requests": {"memory": "24Gi"}, "limits": {"memory": "30Gi"}}, "30Gi"),
    ],
)
def test_operator_run_tgi_has_a_memory_limit_whatever_the_pipeline_names(
    resources: dict[str, Any] | None, limit: str
) -> None:
    tgi: dict[str, Any] = {"resources": resources} if resources else {}
    pp = pipeline(with_model={"name": "m", "backend": "tgi", "tgi": tgi})
    out = children(pp, "ns1", SETTINGS, State(active=Slot("v1", BLUE)))
    pod = by_kind(out, "Deployment")["quickstart-backend-blue"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["memory"] == limit


KEYS = '{"issuer": "https://kubernetes.default.svc.cluster.local", "keys": []}'


def test_each_stage_pod_proves_who_it_is_with_a_token_for_its_pipeline_and_reads_the_clusters_keys() -> None:
    out = children(pipeline(), "ns1", SETTINGS, issuer_keys=KEYS)
    accounts = by_kind(out, "ServiceAccount")
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    assert by_kind(out, "ConfigMap")["quickstart-identity"]["data"] == {"keys.json": KEYS}
    for name, made in by_kind(out, "Deployment").items():
        pod = made["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name and name in accounts
        assert pod["automountServiceAccountToken"] is False, "no API token in a stage that never calls the API"
        (volume,) = [v for v in pod["volumes"] if v["name"] == "identity"]
        token, keys = volume["projected"]["sources"]
        assert token == {
            "serviceAccountToken": {
                "audience": "promptpipe.io/ns1/quickstart",
                "expirationSeconds": 600,
                "path": "token",
            }
        }
        assert keys["configMap"]["name"] == "quickstart-identity"
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PROMPTPIPE_IDENTITY_TOKEN_FILE"] == "/var/run/promptpipe/identity/token"
        assert {"name": "identity", "mountPath": "/var/run/promptpipe/identity", "readOnly": True} in container[
            "volumeMounts"
        ]
    identity = runtime_config(pipeline(), "ns1").identity
    assert identity is not None
    assert identity.audience == "promptpipe.io/ns1/quickstart" and identity.namespace == "ns1"
    assert identity.accounts == {s: f"quickstart-{s.value}" for s in STAGE_ORDER}
    assert identity.keys_file == "/var/run/promptpipe/identity/keys.json" and not identity.signing_key_file


def test_a_fused_stage_has_no_account_of_its_own() -> None:
    doc = copy.deepcopy(QUICKSTART)
    doc["spec"]["fuse"] = ["rag", "assemble"]
    out = children(parse_pipeline(doc), "ns1", SETTINGS, issuer_keys=KEYS)
    assert set(by_kind(out, "ServiceAccount")) == {"quickstart-stream", "quickstart-post", "quickstart-inference"}


def _config(identity: dict[str, Any] | None) -> dict[str, Any]:
    runtime = {"pipeline": {}, "endpoints": {}, **({"identity": identity} if identity is not None else {})}
    return {"kind": "ConfigMap", "data": {"runtime.yaml": yaml.safe_dump(runtime)}}


def _deployment(with_identity: bool, generation: int = 2, observed: int = 2, updated: int = 1) -> dict[str, Any]:
    volumes = [{"name": "config"}, *([{"name": "identity"}] if with_identity else [])]
    return {
        "metadata": {"generation": generation},
        "spec": {"template": {"spec": {"volumes": volumes}}},
        "status": {"observedGeneration": observed, "replicas": 1, "updatedReplicas": updated},
    }


def test_identity_is_enforced_from_the_start_and_after_an_upgrade_only_once_every_pod_sends_a_token() -> None:
    # A new pipeline, and one already enforcing: enforced, whatever its pods do (a later roll changes nothing).
    assert identity_enforceable(None, [])
    enforcing = _config({"enforce": True})
    assert identity_enforceable(enforcing, [_deployment(True, updated=0), _deployment(True, observed=1)])
    # Made by a version without identity: not until every stage Deployment has the volume and has rolled out.
    old = _config(None)
    assert not identity_enforceable(old, [_deployment(False), _deployment(True)])
    assert not identity_enforceable(old, [_deployment(True), _deployment(True, updated=0)])  # old pods left
    assert not identity_enforceable(old, [_deployment(True, observed=1)])  # the new template not yet seen
    assert identity_enforceable(old, [_deployment(True), _deployment(True)])
    assert identity_enforceable(_config({"enforce": False}), [_deployment(True)])
    # What the stages read.
    for enforce in (True, False):
        out = children(pipeline(), "ns1", SETTINGS, issuer_keys=KEYS, enforce_identity=enforce)
        runtime = yaml.safe_load(by_kind(out, "ConfigMap")["quickstart-config"]["data"]["runtime.yaml"])
        assert runtime["identity"]["enforce"] is enforce


def test_a_drain_takes_one_pod_of_a_component_at_a_time_and_replicas_spread_over_nodes() -> None:
    pp = pipeline(
        with_model={"name": "m", "version": "v1", "backend": "tgi", "tgi": {"replicas": 2}},
        rag={"scaling": {"minReplicas": 1, "maxReplicas": 1}},
    )
    out = children(pp, "ns1", SETTINGS, State(active=Slot("v1", BLUE)))
    budgets = by_kind(out, "PodDisruptionBudget")
    # rag may run one pod only: a budget would block every drain of its node, so it gets none.
    assert set(budgets) == {f"quickstart-{c}" for c in ("stream", "assemble", "inference", "post", "backend")}
    for name, budget in budgets.items():
        component = name.removeprefix("quickstart-")
        assert budget["spec"]["maxUnavailable"] == 1 and budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
    for name, d in by_kind(out, "Deployment").items():
        pod = d["spec"]["template"]["spec"]
        keys = [(c["topologyKey"], c["whenUnsatisfiable"]) for c in pod["topologySpreadConstraints"]]
        assert keys == [("kubernetes.io/hostname", "ScheduleAnyway"), ("topology.kubernetes.io/zone", "ScheduleAnyway")]
        for c in pod["topologySpreadConstraints"]:
            assert c["labelSelector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items(), (
                name
            )
    gateway = by_kind(out, "Deployment")["quickstart-stream"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}, "serving while the endpoints move"
    inference = by_kind(out, "Deployment")["quickstart-inference"]["spec"]["template"]["spec"]["containers"][0]
    assert "lifecycle" not in inference

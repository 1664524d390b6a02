from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATUS_UNSPECIFIED: _ClassVar[ServingStatus]
    SERVING: _ClassVar[ServingStatus]
    DRAINING: _ClassVar[ServingStatus]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
SERVING_STATUS_UNSPECIFIED: ServingStatus
SERVING: ServingStatus
DRAINING: ServingStatus

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "text", "tokens", "chat", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "request_id", "stop", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos", "logprobs", "prompt_logprobs", "response_format")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    tokens: TokenIds
    chat: ChatMessages
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    stop: _containers.RepeatedScalarFieldContainer[str]
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    min_tokens: int
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    response_format: str
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ..., stop: _Optional[_Iterable[str]] = ..., min_p: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., min_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., response_format: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "usage", "logprobs", "prompt_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "vocab_size", "max_seq_len", "chain", "has_tokenizer", "eos_token_ids", "base_model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    vocab_size: int
    max_seq_len: int
    chain: _containers.RepeatedScalarFieldContainer[str]
    has_tokenizer: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    base_model: str
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., chain: _Optional[_Iterable[str]] = ..., has_tokenizer: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., base_model: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "models_loaded", "in_flight")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    status: ServingStatus
    models_loaded: int
    in_flight: int
    def __init__(self, status: _Optional[_Union[ServingStatus, str]] = ..., models_loaded: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlockStats(_message.Message):
    __slots__ = ("block_id", "kind", "models", "resident_bytes", "batch_size", "batches_run", "mean_occupancy", "kv_slots_used", "kv_slots_free", "placement")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_RUN_FIELD_NUMBER: _ClassVar[int]
    MEAN_OCCUPANCY_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    kind: str
    models: _containers.RepeatedScalarFieldContainer[str]
    resident_bytes: int
    batch_size: int
    batches_run: int
    mean_occupancy: float
    kv_slots_used: int
    kv_slots_free: int
    placement: str
    def __init__(self, block_id: _Optional[str] = ..., kind: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., resident_bytes: _Optional[int] = ..., batch_size: _Optional[int] = ..., batches_run: _Optional[int] = ..., mean_occupancy: _Optional[float] = ..., kv_slots_used: _Optional[int] = ..., kv_slots_free: _Optional[int] = ..., placement: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("blocks", "queue_depth", "requests", "json")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockStats]
    queue_depth: int
    requests: _containers.ScalarMap[str, int]
    json: str
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockStats, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., requests: _Optional[_Mapping[str, int]] = ..., json: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "platform", "kind", "memory_bytes", "memory_limit_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: int
    platform: str
    kind: str
    memory_bytes: int
    memory_limit_bytes: int
    def __init__(self, id: _Optional[int] = ..., platform: _Optional[str] = ..., kind: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "address", "devices", "hosted_blocks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOSTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    hosted_blocks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., hosted_blocks: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_s: float
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("blocks_hosted", "resident_bytes", "kv_bytes", "batches_run", "batches_running", "mailbox_rows", "mailbox_bytes", "blocks_loaded")
    BLOCKS_HOSTED_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_RUN_FIELD_NUMBER: _ClassVar[int]
    BATCHES_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_LOADED_FIELD_NUMBER: _ClassVar[int]
    blocks_hosted: int
    resident_bytes: int
    kv_bytes: int
    batches_run: int
    batches_running: int
    mailbox_rows: int
    mailbox_bytes: int
    blocks_loaded: int
    def __init__(self, blocks_hosted: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., batches_run: _Optional[int] = ..., batches_running: _Optional[int] = ..., mailbox_rows: _Optional[int] = ..., mailbox_bytes: _Optional[int] = ..., blocks_loaded: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "devices", "load")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    load: WorkerLoad
    def __init__(self, worker_id: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostBlockRequest(_message.Message):
    __slots__ = ("block_id", "zoo_dir", "batch_size", "kv_slots", "max_len", "kv_pages", "page_size", "lora_bank")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    ZOO_DIR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LORA_BANK_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    zoo_dir: str
    batch_size: int
    kv_slots: int
    max_len: int
    kv_pages: int
    page_size: int
    lora_bank: LoraBank
    def __init__(self, block_id: _Optional[str] = ..., zoo_dir: _Optional[str] = ..., batch_size: _Optional[int] = ..., kv_slots: _Optional[int] = ..., max_len: _Optional[int] = ..., kv_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., lora_bank: _Optional[_Union[LoraBank, _Mapping]] = ...) -> None: ...

class LoraBank(_message.Message):
    __slots__ = ("slots", "max_rank", "targets", "deltas")
    class DeltasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    slots: int
    max_rank: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    deltas: _containers.MessageMap[str, Tensor]
    def __init__(self, slots: _Optional[int] = ..., max_rank: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., deltas: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class HostBlockResponse(_message.Message):
    __slots__ = ("resident_bytes", "placement", "lora_bank_bytes")
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LORA_BANK_BYTES_FIELD_NUMBER: _ClassVar[int]
    resident_bytes: int
    placement: str
    lora_bank_bytes: int
    def __init__(self, resident_bytes: _Optional[int] = ..., placement: _Optional[str] = ..., lora_bank_bytes: _Optional[int] = ...) -> None: ...

class InstallAdapterRequest(_message.Message):
    __slots__ = ("block_id", "slot", "factors")
    class FactorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    slot: int
    factors: _containers.MessageMap[str, Tensor]
    def __init__(self, block_id: _Optional[str] = ..., slot: _Optional[int] = ..., factors: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class InstallAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnhostBlockRequest(_message.Message):
    __slots__ = ("block_id",)
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    def __init__(self, block_id: _Optional[str] = ...) -> None: ...

class UnhostBlockResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunBlockRequest(_message.Message):
    __slots__ = ("block_id", "inputs", "sources", "output_handle", "destinations", "row_destinations")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    ROW_DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    inputs: _containers.MessageMap[str, Tensor]
    sources: _containers.RepeatedCompositeFieldContainer[RowSource]
    output_handle: int
    destinations: _containers.RepeatedCompositeFieldContainer[RowDestination]
    row_destinations: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., sources: _Optional[_Iterable[_Union[RowSource, _Mapping]]] = ..., output_handle: _Optional[int] = ..., destinations: _Optional[_Iterable[_Union[RowDestination, _Mapping]]] = ..., row_destinations: _Optional[_Iterable[int]] = ...) -> None: ...

class RowSource(_message.Message):
    __slots__ = ("handle", "row")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    handle: int
    row: int
    def __init__(self, handle: _Optional[int] = ..., row: _Optional[int] = ...) -> None: ...

class RowDestination(_message.Message):
    __slots__ = ("kind", "address", "block_id")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RETURN: _ClassVar[RowDestination.Kind]
        KEEP: _ClassVar[RowDestination.Kind]
        PUSH: _ClassVar[RowDestination.Kind]
    RETURN: RowDestination.Kind
    KEEP: RowDestination.Kind
    PUSH: RowDestination.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    kind: RowDestination.Kind
    address: str
    block_id: str
    def __init__(self, kind: _Optional[_Union[RowDestination.Kind, str]] = ..., address: _Optional[str] = ..., block_id: _Optional[str] = ...) -> None: ...

class RunBlockResponse(_message.Message):
    __slots__ = ("outputs", "returned_rows", "undelivered", "rows_pushed", "bytes_pushed")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURNED_ROWS_FIELD_NUMBER: _ClassVar[int]
    UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    returned_rows: _containers.RepeatedScalarFieldContainer[int]
    undelivered: _containers.RepeatedScalarFieldContainer[str]
    rows_pushed: int
    bytes_pushed: int
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., returned_rows: _Optional[_Iterable[int]] = ..., undelivered: _Optional[_Iterable[str]] = ..., rows_pushed: _Optional[int] = ..., bytes_pushed: _Optional[int] = ...) -> None: ...

class PutRowsRequest(_message.Message):
    __slots__ = ("handle", "block_id", "rows", "data")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    handle: int
    block_id: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    data: Tensor
    def __init__(self, handle: _Optional[int] = ..., block_id: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PutRowsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TakeRowsRequest(_message.Message):
    __slots__ = ("handle", "rows")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    handle: int
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, handle: _Optional[int] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class TakeRowsResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: Tensor
    def __init__(self, data: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ReleaseRowsRequest(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, handles: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRowsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FreeSlotsRequest(_message.Message):
    __slots__ = ("block_id", "slots")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_id: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class FreeSlotsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

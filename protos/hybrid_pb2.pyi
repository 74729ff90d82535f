from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_LAYOUT_UNSPECIFIED: _ClassVar[KvLayout]
    KV_LAYOUT_DENSE: _ClassVar[KvLayout]
    KV_LAYOUT_HBM: _ClassVar[KvLayout]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FP16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
    DTYPE_FP32: _ClassVar[DType]

class KvTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KvTransport]
    KV_TRANSPORT_SHM: _ClassVar[KvTransport]
    KV_TRANSPORT_GRPC: _ClassVar[KvTransport]
KV_LAYOUT_UNSPECIFIED: KvLayout
KV_LAYOUT_DENSE: KvLayout
KV_LAYOUT_HBM: KvLayout
DTYPE_UNSPECIFIED: DType
DTYPE_FP16: DType
DTYPE_BF16: DType
DTYPE_FP32: DType
KV_TRANSPORT_UNSPECIFIED: KvTransport
KV_TRANSPORT_SHM: KvTransport
KV_TRANSPORT_GRPC: KvTransport

class LayerRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class KvDescriptor(_message.Message):
    __slots__ = ("region", "epoch", "slot", "offset", "length", "generation", "layout", "dtype", "n_layers", "n_tokens", "layers", "n_kv_heads", "head_dim", "checksums", "secret", "on_device")
    REGION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    ON_DEVICE_FIELD_NUMBER: _ClassVar[int]
    region: str
    epoch: int
    slot: int
    offset: int
    length: int
    generation: int
    layout: KvLayout
    dtype: DType
    n_layers: int
    n_tokens: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerRange]
    n_kv_heads: int
    head_dim: int
    checksums: bool
    secret: bytes
    on_device: bool
    def __init__(self, region: _Optional[str] = ..., epoch: _Optional[int] = ..., slot: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., generation: _Optional[int] = ..., layout: _Optional[_Union[KvLayout, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., n_layers: _Optional[int] = ..., n_tokens: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerRange, _Mapping]]] = ..., n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., checksums: _Optional[bool] = ..., secret: _Optional[bytes] = ..., on_device: _Optional[bool] = ...) -> None: ...

class KvHandle(_message.Message):
    __slots__ = ("request_id", "kv", "weights_fingerprint", "model", "lease_ms", "prompt_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv: KvDescriptor
    weights_fingerprint: str
    model: str
    lease_ms: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., kv: _Optional[_Union[KvDescriptor, _Mapping]] = ..., weights_fingerprint: _Optional[str] = ..., model: _Optional[str] = ..., lease_ms: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_ids", "layout", "sampling", "max_new_tokens", "expected_fingerprint", "kv_dtype", "kv_on_device")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_ON_DEVICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    layout: KvLayout
    sampling: SamplingParams
    max_new_tokens: int
    expected_fingerprint: str
    kv_dtype: DType
    kv_on_device: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[KvLayout, str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., expected_fingerprint: _Optional[str] = ..., kv_dtype: _Optional[_Union[DType, str]] = ..., kv_on_device: _Optional[bool] = ...) -> None: ...

class PrefillTimings(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "transfer_ms", "exposed_transfer_ms", "kv_bytes")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    transfer_ms: float
    exposed_transfer_ms: float
    kv_bytes: int
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., exposed_transfer_ms: _Optional[float] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("first_token", "first_text", "timings", "device")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    first_text: str
    timings: PrefillTimings
    device: str
    def __init__(self, first_token: _Optional[int] = ..., first_text: _Optional[str] = ..., timings: _Optional[_Union[PrefillTimings, _Mapping]] = ..., device: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("handle", "done")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    handle: KvHandle
    done: PrefillDone
    def __init__(self, handle: _Optional[_Union[KvHandle, _Mapping]] = ..., done: _Optional[_Union[PrefillDone, _Mapping]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("request_id", "kv", "consumer", "consumer_epoch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv: KvDescriptor
    consumer: str
    consumer_epoch: int
    def __init__(self, request_id: _Optional[str] = ..., kv: _Optional[_Union[KvDescriptor, _Mapping]] = ..., consumer: _Optional[str] = ..., consumer_epoch: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("consumer", "consumer_epoch", "device_bus_id")
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    consumer_epoch: int
    device_bus_id: str
    def __init__(self, consumer: _Optional[str] = ..., consumer_epoch: _Optional[int] = ..., device_bus_id: _Optional[str] = ...) -> None: ...

class KvDevice(_message.Message):
    __slots__ = ("bus_id", "ipc_handle", "nbytes", "payload_offset")
    BUS_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_OFFSET_FIELD_NUMBER: _ClassVar[int]
    bus_id: str
    ipc_handle: bytes
    nbytes: int
    payload_offset: int
    def __init__(self, bus_id: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., nbytes: _Optional[int] = ..., payload_offset: _Optional[int] = ...) -> None: ...

class AttachReply(_message.Message):
    __slots__ = ("region", "region_epoch", "reclaimed", "weights_fingerprint", "kv_device")
    REGION_FIELD_NUMBER: _ClassVar[int]
    REGION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KV_DEVICE_FIELD_NUMBER: _ClassVar[int]
    region: str
    region_epoch: int
    reclaimed: int
    weights_fingerprint: str
    kv_device: KvDevice
    def __init__(self, region: _Optional[str] = ..., region_epoch: _Optional[int] = ..., reclaimed: _Optional[int] = ..., weights_fingerprint: _Optional[str] = ..., kv_device: _Optional[_Union[KvDevice, _Mapping]] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("lease_ms",)
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    def __init__(self, lease_ms: _Optional[int] = ...) -> None: ...

class FetchKvRequest(_message.Message):
    __slots__ = ("request_id", "kv", "chunk_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv: KvDescriptor
    chunk_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., kv: _Optional[_Union[KvDescriptor, _Mapping]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer", "offset", "data", "layer_done", "first_token")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAYER_DONE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    layer: int
    offset: int
    data: bytes
    layer_done: bool
    first_token: int
    def __init__(self, layer: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., layer_done: _Optional[bool] = ..., first_token: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("model", "weights_fingerprint", "device", "backend", "kv_layout", "dtype", "region", "region_bytes", "max_positions", "synthetic", "n_layers", "version", "counters", "region_epoch", "not_serving", "prefills", "kv_device")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    REGION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_FIELD_NUMBER: _ClassVar[int]
    PREFILLS_FIELD_NUMBER: _ClassVar[int]
    KV_DEVICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_fingerprint: str
    device: str
    backend: str
    kv_layout: KvLayout
    dtype: DType
    region: str
    region_bytes: int
    max_positions: int
    synthetic: bool
    n_layers: int
    version: str
    counters: _containers.ScalarMap[str, int]
    region_epoch: int
    not_serving: str
    prefills: _containers.RepeatedCompositeFieldContainer[PairedPrefill]
    kv_device: str
    def __init__(self, model: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., kv_layout: _Optional[_Union[KvLayout, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., region: _Optional[str] = ..., region_bytes: _Optional[int] = ..., max_positions: _Optional[int] = ..., synthetic: _Optional[bool] = ..., n_layers: _Optional[int] = ..., version: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ..., region_epoch: _Optional[int] = ..., not_serving: _Optional[str] = ..., prefills: _Optional[_Iterable[_Union[PairedPrefill, _Mapping]]] = ..., kv_device: _Optional[str] = ...) -> None: ...

class PairedPrefill(_message.Message):
    __slots__ = ("address", "region", "region_epoch", "local", "state", "device")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    REGION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    address: str
    region: str
    region_epoch: int
    local: bool
    state: str
    device: bool
    def __init__(self, address: _Optional[str] = ..., region: _Optional[str] = ..., region_epoch: _Optional[int] = ..., local: _Optional[bool] = ..., state: _Optional[str] = ..., device: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "handle", "sampling", "max_new_tokens", "stop_ids", "transport", "ignore_eos", "stop")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handle: KvHandle
    sampling: SamplingParams
    max_new_tokens: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    transport: KvTransport
    ignore_eos: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., handle: _Optional[_Union[KvHandle, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ..., transport: _Optional[_Union[KvTransport, str]] = ..., ignore_eos: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("ids", "text")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class DecodeTimings(_message.Message):
    __slots__ = ("ingest_ms", "ingest_wait_ms", "decode_ms", "decode_ms_per_token", "modeled_device_ms_per_token", "n_tokens", "queue_ms", "kv_path")
    INGEST_MS_FIELD_NUMBER: _ClassVar[int]
    INGEST_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODELED_DEVICE_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_PATH_FIELD_NUMBER: _ClassVar[int]
    ingest_ms: float
    ingest_wait_ms: float
    decode_ms: float
    decode_ms_per_token: float
    modeled_device_ms_per_token: float
    n_tokens: int
    queue_ms: float
    kv_path: str
    def __init__(self, ingest_ms: _Optional[float] = ..., ingest_wait_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., decode_ms_per_token: _Optional[float] = ..., modeled_device_ms_per_token: _Optional[float] = ..., n_tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., kv_path: _Optional[str] = ...) -> None: ...

class GenerateDone(_message.Message):
    __slots__ = ("finish_reason", "timings", "backend")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    timings: DecodeTimings
    backend: str
    def __init__(self, finish_reason: _Optional[str] = ..., timings: _Optional[_Union[DecodeTimings, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "done")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenChunk
    done: GenerateDone
    def __init__(self, tokens: _Optional[_Union[TokenChunk, _Mapping]] = ..., done: _Optional[_Union[GenerateDone, _Mapping]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NonceRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class NonceResponse(_message.Message):
    __slots__ = ("version", "nonce", "expires_in_s")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    version: int
    nonce: bytes
    expires_in_s: float
    def __init__(self, version: _Optional[int] = ..., nonce: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class AdmitRequest(_message.Message):
    __slots__ = ("version", "party", "job_id", "nonce", "server_cert_sha256", "certificate_der", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    party: str
    job_id: str
    nonce: bytes
    server_cert_sha256: bytes
    certificate_der: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., party: _Optional[str] = ..., job_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., server_cert_sha256: _Optional[bytes] = ..., certificate_der: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("version", "session_token", "expires_in_s", "server_party")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_PARTY_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_token: bytes
    expires_in_s: float
    server_party: str
    def __init__(self, version: _Optional[int] = ..., session_token: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ..., server_party: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("version", "ready", "party", "methods")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    version: int
    ready: bool
    party: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., ready: _Optional[bool] = ..., party: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...

class CallHeader(_message.Message):
    __slots__ = ("version", "method", "meta_json", "tensor_count")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    version: int
    method: str
    meta_json: str
    tensor_count: int
    def __init__(self, version: _Optional[int] = ..., method: _Optional[str] = ..., meta_json: _Optional[str] = ..., tensor_count: _Optional[int] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("version", "name", "dtype", "shape", "nbytes", "kind")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    version: int
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    kind: str
    def __init__(self, version: _Optional[int] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: CallHeader
    tensor: TensorHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[CallHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

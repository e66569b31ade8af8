from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Key(_message.Message):
    __slots__ = ("key_id", "consumer", "scopes", "plan", "version", "status", "expires_at", "created_at", "created_by", "rotated_at", "rotated_by", "successor", "revoked_at", "revoked_by", "last_used_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    ROTATED_AT_FIELD_NUMBER: _ClassVar[int]
    ROTATED_BY_FIELD_NUMBER: _ClassVar[int]
    SUCCESSOR_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    consumer: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    plan: str
    version: str
    status: str
    expires_at: float
    created_at: float
    created_by: str
    rotated_at: float
    rotated_by: str
    successor: str
    revoked_at: float
    revoked_by: str
    last_used_at: float
    def __init__(self, key_id: _Optional[str] = ..., consumer: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., plan: _Optional[str] = ..., version: _Optional[str] = ..., status: _Optional[str] = ..., expires_at: _Optional[float] = ..., created_at: _Optional[float] = ..., created_by: _Optional[str] = ..., rotated_at: _Optional[float] = ..., rotated_by: _Optional[str] = ..., successor: _Optional[str] = ..., revoked_at: _Optional[float] = ..., revoked_by: _Optional[str] = ..., last_used_at: _Optional[float] = ...) -> None: ...

class CreateRequest(_message.Message):
    __slots__ = ("consumer", "scopes", "plan", "version", "expires_in_seconds")
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    consumer: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    plan: str
    version: str
    expires_in_seconds: float
    def __init__(self, consumer: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., plan: _Optional[str] = ..., version: _Optional[str] = ..., expires_in_seconds: _Optional[float] = ...) -> None: ...

class IssuedKey(_message.Message):
    __slots__ = ("record", "key")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    record: Key
    key: str
    def __init__(self, record: _Optional[_Union[Key, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("key_id", "reason")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    reason: str
    def __init__(self, key_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RotateRequest(_message.Message):
    __slots__ = ("key_id", "grace_seconds")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    grace_seconds: float
    def __init__(self, key_id: _Optional[str] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class RotateResponse(_message.Message):
    __slots__ = ("retired", "successor")
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    SUCCESSOR_FIELD_NUMBER: _ClassVar[int]
    retired: Key
    successor: IssuedKey
    def __init__(self, retired: _Optional[_Union[Key, _Mapping]] = ..., successor: _Optional[_Union[IssuedKey, _Mapping]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("at", "actor", "action", "key_id", "consumer", "detail")
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    at: float
    actor: str
    action: str
    key_id: str
    consumer: str
    detail: str
    def __init__(self, at: _Optional[float] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., key_id: _Optional[str] = ..., consumer: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("records_jsonl",)
    RECORDS_JSONL_FIELD_NUMBER: _ClassVar[int]
    records_jsonl: str
    def __init__(self, records_jsonl: _Optional[str] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("records_jsonl",)
    RECORDS_JSONL_FIELD_NUMBER: _ClassVar[int]
    records_jsonl: str
    def __init__(self, records_jsonl: _Optional[str] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("imported",)
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    imported: int
    def __init__(self, imported: _Optional[int] = ...) -> None: ...

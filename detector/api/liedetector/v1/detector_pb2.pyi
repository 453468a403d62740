from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_STATE_UNSPECIFIED: _ClassVar[RequestState]
    REQUEST_STATE_RUNNING: _ClassVar[RequestState]
    REQUEST_STATE_FINISHED: _ClassVar[RequestState]
    REQUEST_STATE_INCOMPLETE: _ClassVar[RequestState]

class CaptureState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTURE_STATE_UNSPECIFIED: _ClassVar[CaptureState]
    CAPTURE_STATE_ON: _ClassVar[CaptureState]
    CAPTURE_STATE_OFF: _ClassVar[CaptureState]
REQUEST_STATE_UNSPECIFIED: RequestState
REQUEST_STATE_RUNNING: RequestState
REQUEST_STATE_FINISHED: RequestState
REQUEST_STATE_INCOMPLETE: RequestState
CAPTURE_STATE_UNSPECIFIED: CaptureState
CAPTURE_STATE_ON: CaptureState
CAPTURE_STATE_OFF: CaptureState

class GetScoresRequest(_message.Message):
    __slots__ = ("request_id", "wait_until_finished")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_FINISHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_until_finished: bool
    def __init__(self, request_id: _Optional[str] = ..., wait_until_finished: _Optional[bool] = ...) -> None: ...

class StreamScoresRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ProbeScore(_message.Message):
    __slots__ = ("probe", "probability", "flagged", "outside")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_FIELD_NUMBER: _ClassVar[int]
    probe: str
    probability: float
    flagged: bool
    outside: bool
    def __init__(self, probe: _Optional[str] = ..., probability: _Optional[float] = ..., flagged: _Optional[bool] = ..., outside: _Optional[bool] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("index", "position", "token_id", "scored", "scores", "text", "generated_unix_nano")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    index: int
    position: int
    token_id: int
    scored: bool
    scores: _containers.RepeatedCompositeFieldContainer[ProbeScore]
    text: str
    generated_unix_nano: int
    def __init__(self, index: _Optional[int] = ..., position: _Optional[int] = ..., token_id: _Optional[int] = ..., scored: _Optional[bool] = ..., scores: _Optional[_Iterable[_Union[ProbeScore, _Mapping]]] = ..., text: _Optional[str] = ..., generated_unix_nano: _Optional[int] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("char_start", "char_end", "token_start", "token_end", "text", "kind", "probe", "score", "threshold", "flagged")
    CHAR_START_FIELD_NUMBER: _ClassVar[int]
    CHAR_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    text: str
    kind: str
    probe: str
    score: float
    threshold: float
    flagged: bool
    def __init__(self, char_start: _Optional[int] = ..., char_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., text: _Optional[str] = ..., kind: _Optional[str] = ..., probe: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., flagged: _Optional[bool] = ...) -> None: ...

class ResponseVerdict(_message.Message):
    __slots__ = ("probe", "score", "threshold", "flagged", "claims", "flagged_claims")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_CLAIMS_FIELD_NUMBER: _ClassVar[int]
    probe: str
    score: float
    threshold: float
    flagged: bool
    claims: int
    flagged_claims: int
    def __init__(self, probe: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., flagged: _Optional[bool] = ..., claims: _Optional[int] = ..., flagged_claims: _Optional[int] = ...) -> None: ...

class Drift(_message.Message):
    __slots__ = ("probe", "rows", "rows_outside", "outside_fraction", "out_of_distribution")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_OUTSIDE_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    probe: str
    rows: int
    rows_outside: int
    outside_fraction: float
    out_of_distribution: bool
    def __init__(self, probe: _Optional[str] = ..., rows: _Optional[int] = ..., rows_outside: _Optional[int] = ..., outside_fraction: _Optional[float] = ..., out_of_distribution: _Optional[bool] = ...) -> None: ...

class ScoresResponse(_message.Message):
    __slots__ = ("request_id", "engine_request_id", "state", "incomplete_reason", "num_prompt_tokens", "probes", "tokens", "spans", "text", "verdicts", "requests_with_id", "drift")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WITH_ID_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_request_id: str
    state: RequestState
    incomplete_reason: str
    num_prompt_tokens: int
    probes: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    text: str
    verdicts: _containers.RepeatedCompositeFieldContainer[ResponseVerdict]
    requests_with_id: int
    drift: _containers.RepeatedCompositeFieldContainer[Drift]
    def __init__(self, request_id: _Optional[str] = ..., engine_request_id: _Optional[str] = ..., state: _Optional[_Union[RequestState, str]] = ..., incomplete_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., probes: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., text: _Optional[str] = ..., verdicts: _Optional[_Iterable[_Union[ResponseVerdict, _Mapping]]] = ..., requests_with_id: _Optional[int] = ..., drift: _Optional[_Iterable[_Union[Drift, _Mapping]]] = ...) -> None: ...

class ScoresUpdate(_message.Message):
    __slots__ = ("request_id", "engine_request_id", "state", "incomplete_reason", "tokens", "spans", "final", "verdicts", "requests_with_id", "drift")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WITH_ID_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_request_id: str
    state: RequestState
    incomplete_reason: str
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    final: bool
    verdicts: _containers.RepeatedCompositeFieldContainer[ResponseVerdict]
    requests_with_id: int
    drift: _containers.RepeatedCompositeFieldContainer[Drift]
    def __init__(self, request_id: _Optional[str] = ..., engine_request_id: _Optional[str] = ..., state: _Optional[_Union[RequestState, str]] = ..., incomplete_reason: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., final: _Optional[bool] = ..., verdicts: _Optional[_Iterable[_Union[ResponseVerdict, _Mapping]]] = ..., requests_with_id: _Optional[int] = ..., drift: _Optional[_Iterable[_Union[Drift, _Mapping]]] = ...) -> None: ...

class ListProbesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProbeInfo(_message.Message):
    __slots__ = ("name", "layers", "score_position", "aggregation", "calibration", "threshold", "model_name", "model_fingerprint", "path", "inactive_reason", "token_features")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SCORE_POSITION_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    score_position: str
    aggregation: str
    calibration: str
    threshold: float
    model_name: str
    model_fingerprint: str
    path: str
    inactive_reason: str
    token_features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., score_position: _Optional[str] = ..., aggregation: _Optional[str] = ..., calibration: _Optional[str] = ..., threshold: _Optional[float] = ..., model_name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., path: _Optional[str] = ..., inactive_reason: _Optional[str] = ..., token_features: _Optional[_Iterable[str]] = ...) -> None: ...

class ListProbesResponse(_message.Message):
    __slots__ = ("probes", "capture_status")
    PROBES_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_STATUS_FIELD_NUMBER: _ClassVar[int]
    probes: _containers.RepeatedCompositeFieldContainer[ProbeInfo]
    capture_status: CaptureStatus
    def __init__(self, probes: _Optional[_Iterable[_Union[ProbeInfo, _Mapping]]] = ..., capture_status: _Optional[_Union[CaptureStatus, _Mapping]] = ...) -> None: ...

class CaptureStatus(_message.Message):
    __slots__ = ("state", "summary", "reason", "model", "pid", "layers", "capture_method", "seconds_since_heard")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_METHOD_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARD_FIELD_NUMBER: _ClassVar[int]
    state: CaptureState
    summary: str
    reason: str
    model: str
    pid: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    capture_method: str
    seconds_since_heard: float
    def __init__(self, state: _Optional[_Union[CaptureState, str]] = ..., summary: _Optional[str] = ..., reason: _Optional[str] = ..., model: _Optional[str] = ..., pid: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., capture_method: _Optional[str] = ..., seconds_since_heard: _Optional[float] = ...) -> None: ...

class LoadProbeRequest(_message.Message):
    __slots__ = ("path", "replace")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    path: str
    replace: bool
    def __init__(self, path: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class UnloadProbeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadProbeResponse(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

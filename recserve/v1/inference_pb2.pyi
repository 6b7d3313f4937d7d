from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_ENCODING_UNSPECIFIED: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_FLOAT: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_PACKED_F32: _ClassVar[VectorEncoding]
    VECTOR_ENCODING_PACKED_F16: _ClassVar[VectorEncoding]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_TRUNCATE: _ClassVar[Truncation]
    TRUNCATION_STRICT: _ClassVar[Truncation]

class Similarity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIMILARITY_UNSPECIFIED: _ClassVar[Similarity]
    SIMILARITY_COSINE: _ClassVar[Similarity]
    SIMILARITY_DOT: _ClassVar[Similarity]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_RETRIEVAL: _ClassVar[Stage]
    STAGE_RERANK: _ClassVar[Stage]
VECTOR_ENCODING_UNSPECIFIED: VectorEncoding
VECTOR_ENCODING_FLOAT: VectorEncoding
VECTOR_ENCODING_PACKED_F32: VectorEncoding
VECTOR_ENCODING_PACKED_F16: VectorEncoding
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_TRUNCATE: Truncation
TRUNCATION_STRICT: Truncation
SIMILARITY_UNSPECIFIED: Similarity
SIMILARITY_COSINE: Similarity
SIMILARITY_DOT: Similarity
STAGE_UNSPECIFIED: Stage
STAGE_RETRIEVAL: Stage
STAGE_RERANK: Stage

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "encoding", "normalize", "truncation", "model")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    encoding: VectorEncoding
    normalize: bool
    truncation: Truncation
    model: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ..., normalize: _Optional[bool] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., model: _Optional[str] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("dimension", "encoding", "vectors", "packed", "truncated", "token_counts")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    encoding: VectorEncoding
    vectors: _containers.RepeatedCompositeFieldContainer[Vector]
    packed: bytes
    truncated: _containers.RepeatedScalarFieldContainer[int]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dimension: _Optional[int] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ..., vectors: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., packed: _Optional[bytes] = ..., truncated: _Optional[_Iterable[int]] = ..., token_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class UserHistory(_message.Message):
    __slots__ = ("texts", "weights")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("query_text", "user_history", "candidates", "similarity", "truncation", "model", "candidate_ids", "catalog")
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    USER_HISTORY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    query_text: str
    user_history: UserHistory
    candidates: _containers.RepeatedScalarFieldContainer[str]
    similarity: Similarity
    truncation: Truncation
    model: str
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    catalog: str
    def __init__(self, query_text: _Optional[str] = ..., user_history: _Optional[_Union[UserHistory, _Mapping]] = ..., candidates: _Optional[_Iterable[str]] = ..., similarity: _Optional[_Union[Similarity, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., model: _Optional[str] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., catalog: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "truncated")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    truncated: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., truncated: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts_per_call", "max_text_bytes", "max_message_bytes", "max_batch_tokens", "max_batch_size", "max_queue_texts")
    MAX_TEXTS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TEXTS_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_call: int
    max_text_bytes: int
    max_message_bytes: int
    max_batch_tokens: int
    max_batch_size: int
    max_queue_texts: int
    def __init__(self, max_texts_per_call: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue_texts: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "weights_sha256", "task", "dimension", "max_tokens", "precision", "provider", "pooling", "normalize", "limits", "server_version", "variant_sha256", "verified", "name", "models", "labels", "multi_label")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    weights_sha256: str
    task: str
    dimension: int
    max_tokens: int
    precision: str
    provider: str
    pooling: str
    normalize: bool
    limits: Limits
    server_version: str
    variant_sha256: str
    verified: bool
    name: str
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    labels: _containers.RepeatedScalarFieldContainer[str]
    multi_label: bool
    def __init__(self, model_name: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., task: _Optional[str] = ..., dimension: _Optional[int] = ..., max_tokens: _Optional[int] = ..., precision: _Optional[str] = ..., provider: _Optional[str] = ..., pooling: _Optional[str] = ..., normalize: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., variant_sha256: _Optional[str] = ..., verified: _Optional[bool] = ..., name: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., multi_label: _Optional[bool] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "task", "dimension", "precision", "default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    dimension: int
    precision: str
    default: bool
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., dimension: _Optional[int] = ..., precision: _Optional[str] = ..., default: _Optional[bool] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("texts", "top_k", "truncation", "model")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    truncation: Truncation
    model: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., model: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability", "index")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    index: int
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "truncated")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    truncated: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., truncated: _Optional[_Iterable[int]] = ...) -> None: ...

class RecommendHistory(_message.Message):
    __slots__ = ("texts", "item_ids", "weights")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., item_ids: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class QueryVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class AttributeFilter(_message.Message):
    __slots__ = ("attribute", "values", "min", "max")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    values: _containers.RepeatedScalarFieldContainer[str]
    min: float
    max: float
    def __init__(self, attribute: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("model", "catalog", "query_text", "user_history", "query_vector", "k", "exclude_ids", "filters", "approximate", "rerank_model", "rerank_k", "truncation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    USER_HISTORY_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    RERANK_MODEL_FIELD_NUMBER: _ClassVar[int]
    RERANK_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    catalog: str
    query_text: str
    user_history: RecommendHistory
    query_vector: QueryVector
    k: int
    exclude_ids: _containers.RepeatedScalarFieldContainer[str]
    filters: _containers.RepeatedCompositeFieldContainer[AttributeFilter]
    approximate: bool
    rerank_model: str
    rerank_k: int
    truncation: Truncation
    def __init__(self, model: _Optional[str] = ..., catalog: _Optional[str] = ..., query_text: _Optional[str] = ..., user_history: _Optional[_Union[RecommendHistory, _Mapping]] = ..., query_vector: _Optional[_Union[QueryVector, _Mapping]] = ..., k: _Optional[int] = ..., exclude_ids: _Optional[_Iterable[str]] = ..., filters: _Optional[_Iterable[_Union[AttributeFilter, _Mapping]]] = ..., approximate: _Optional[bool] = ..., rerank_model: _Optional[str] = ..., rerank_k: _Optional[int] = ..., truncation: _Optional[_Union[Truncation, str]] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("id", "score", "stage", "retrieval_score")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    stage: Stage
    retrieval_score: float
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., stage: _Optional[_Union[Stage, str]] = ..., retrieval_score: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "catalog", "retrieve_ms", "rerank_ms")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Recommendation]
    catalog: str
    retrieve_ms: float
    rerank_ms: float
    def __init__(self, items: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., catalog: _Optional[str] = ..., retrieve_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ...) -> None: ...

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
    FINISH_REASON_SUCCESS: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_SUCCESS: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "seed", "num_images", "request_id", "preview_every", "init_image", "mask_image", "strength", "mask_blur", "loras", "decoder", "size_conditioning", "omit_progress", "guidance_end")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    SIZE_CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    OMIT_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_END_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    num_images: int
    request_id: str
    preview_every: int
    init_image: bytes
    mask_image: bytes
    strength: float
    mask_blur: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraSelection]
    decoder: str
    size_conditioning: SizeConditioning
    omit_progress: bool
    guidance_end: float
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., request_id: _Optional[str] = ..., preview_every: _Optional[int] = ..., init_image: _Optional[bytes] = ..., mask_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., mask_blur: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraSelection, _Mapping]]] = ..., decoder: _Optional[str] = ..., size_conditioning: _Optional[_Union[SizeConditioning, _Mapping]] = ..., omit_progress: _Optional[bool] = ..., guidance_end: _Optional[float] = ...) -> None: ...

class SizeConditioning(_message.Message):
    __slots__ = ("original_width", "original_height", "crop_left", "crop_top", "target_width", "target_height")
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CROP_LEFT_FIELD_NUMBER: _ClassVar[int]
    CROP_TOP_FIELD_NUMBER: _ClassVar[int]
    TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    original_width: int
    original_height: int
    crop_left: int
    crop_top: int
    target_width: int
    target_height: int
    def __init__(self, original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., crop_left: _Optional[int] = ..., crop_top: _Optional[int] = ..., target_width: _Optional[int] = ..., target_height: _Optional[int] = ...) -> None: ...

class LoraSelection(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "started", "progress", "artifact")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    started: Started
    progress: Progress
    artifact: Artifact
    def __init__(self, request_id: _Optional[str] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("model", "model_version", "width", "height", "steps", "guidance_scale", "sampler", "seed", "num_images", "truncations", "cost", "mode", "strength", "denoising_steps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATIONS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    DENOISING_STEPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    num_images: int
    truncations: _containers.RepeatedCompositeFieldContainer[PromptTruncation]
    cost: int
    mode: str
    strength: float
    denoising_steps: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., truncations: _Optional[_Iterable[_Union[PromptTruncation, _Mapping]]] = ..., cost: _Optional[int] = ..., mode: _Optional[str] = ..., strength: _Optional[float] = ..., denoising_steps: _Optional[int] = ...) -> None: ...

class PromptTruncation(_message.Message):
    __slots__ = ("field", "kept_tokens", "dropped_tokens", "dropped_text")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TEXT_FIELD_NUMBER: _ClassVar[int]
    field: str
    kept_tokens: int
    dropped_tokens: int
    dropped_text: str
    def __init__(self, field: _Optional[str] = ..., kept_tokens: _Optional[int] = ..., dropped_tokens: _Optional[int] = ..., dropped_text: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "elapsed_s", "preview_png")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total_steps: int
    elapsed_s: float
    preview_png: bytes
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., preview_png: _Optional[bytes] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("index", "mime", "data", "seed", "finish_reason", "timings", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MIME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    mime: str
    data: bytes
    seed: int
    finish_reason: FinishReason
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., mime: _Optional[str] = ..., data: _Optional[bytes] = ..., seed: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "memory_budget_bytes", "memory_used_bytes", "process_resident_bytes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    memory_budget_bytes: int
    memory_used_bytes: int
    process_resident_bytes: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., memory_budget_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., process_resident_bytes: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "precision", "default_width", "default_height", "default_steps", "default_guidance_scale", "default_sampler", "limits", "samplers", "fidelity", "inpainting_model", "source_family", "fused_loras", "embedding_tokens", "adapters", "decoders", "architecture", "loaded", "memory_bytes", "last_used_unix", "pinned", "versions", "loaded_versions", "aliases", "engine", "load_seconds")
    class PrecisionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    INPAINTING_MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FAMILY_FIELD_NUMBER: _ClassVar[int]
    FUSED_LORAS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DECODERS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    precision: _containers.ScalarMap[str, str]
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    default_sampler: str
    limits: ModelLimits
    samplers: _containers.RepeatedScalarFieldContainer[str]
    fidelity: Fidelity
    inpainting_model: bool
    source_family: str
    fused_loras: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    embedding_tokens: _containers.RepeatedScalarFieldContainer[str]
    adapters: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    decoders: _containers.RepeatedScalarFieldContainer[str]
    architecture: str
    loaded: bool
    memory_bytes: int
    last_used_unix: float
    pinned: bool
    versions: _containers.RepeatedScalarFieldContainer[str]
    loaded_versions: _containers.RepeatedScalarFieldContainer[str]
    aliases: _containers.ScalarMap[str, str]
    engine: str
    load_seconds: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., precision: _Optional[_Mapping[str, str]] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., default_sampler: _Optional[str] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., samplers: _Optional[_Iterable[str]] = ..., fidelity: _Optional[_Union[Fidelity, _Mapping]] = ..., inpainting_model: _Optional[bool] = ..., source_family: _Optional[str] = ..., fused_loras: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ..., embedding_tokens: _Optional[_Iterable[str]] = ..., adapters: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ..., decoders: _Optional[_Iterable[str]] = ..., architecture: _Optional[str] = ..., loaded: _Optional[bool] = ..., memory_bytes: _Optional[int] = ..., last_used_unix: _Optional[float] = ..., pinned: _Optional[bool] = ..., versions: _Optional[_Iterable[str]] = ..., loaded_versions: _Optional[_Iterable[str]] = ..., aliases: _Optional[_Mapping[str, str]] = ..., engine: _Optional[str] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class LoraInfo(_message.Message):
    __slots__ = ("name", "sha256", "scale", "rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    scale: float
    rank: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., scale: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class Fidelity(_message.Message):
    __slots__ = ("psnr_db", "ssim", "low_fidelity", "failures")
    PSNR_DB_FIELD_NUMBER: _ClassVar[int]
    SSIM_FIELD_NUMBER: _ClassVar[int]
    LOW_FIDELITY_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    psnr_db: float
    ssim: float
    low_fidelity: bool
    failures: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, psnr_db: _Optional[float] = ..., ssim: _Optional[float] = ..., low_fidelity: _Optional[bool] = ..., failures: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("min_size", "max_size", "max_steps", "max_images", "max_guidance_scale", "max_prompt_chars", "max_loras")
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    min_size: int
    max_size: int
    max_steps: int
    max_images: int
    max_guidance_scale: float
    max_prompt_chars: int
    max_loras: int
    def __init__(self, min_size: _Optional[int] = ..., max_size: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_images: _Optional[int] = ..., max_guidance_scale: _Optional[float] = ..., max_prompt_chars: _Optional[int] = ..., max_loras: _Optional[int] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Balance(_message.Message):
    __slots__ = ("key_id", "tier", "remaining", "daily_credits", "granted", "spent", "held", "reset_unix")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    DAILY_CREDITS_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    RESET_UNIX_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tier: str
    remaining: int
    daily_credits: int
    granted: int
    spent: int
    held: int
    reset_unix: int
    def __init__(self, key_id: _Optional[str] = ..., tier: _Optional[str] = ..., remaining: _Optional[int] = ..., daily_credits: _Optional[int] = ..., granted: _Optional[int] = ..., spent: _Optional[int] = ..., held: _Optional[int] = ..., reset_unix: _Optional[int] = ...) -> None: ...

class GrantCreditsRequest(_message.Message):
    __slots__ = ("key_id", "credits")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    credits: int
    def __init__(self, key_id: _Optional[str] = ..., credits: _Optional[int] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("tier", "label")
    TIER_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    tier: str
    label: str
    def __init__(self, tier: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key_id", "api_key", "tier")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    api_key: str
    tier: str
    def __init__(self, key_id: _Optional[str] = ..., api_key: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("revoked_unix",)
    REVOKED_UNIX_FIELD_NUMBER: _ClassVar[int]
    revoked_unix: float
    def __init__(self, revoked_unix: _Optional[float] = ...) -> None: ...

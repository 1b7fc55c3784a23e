"""Typed configuration: the sections of `params.yaml`, validated as a whole before any model is loaded.

Every invalid value becomes one `ConfigError` line that names the dotted key and what is allowed, e.g.
``prune.sparsity: must be in [0, 1), got 1.5``.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from perp.errors import ConfigError

EMBEDDED_SPLITS = ("wiki-calib", "wiki-eval")  # the embedded corpus, perp/data/embedded.py
MODEL_ALIASES = ("smollm2-135m", "tiny-llama", "tiny-opt")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
PRUNE_COMPUTE_DTYPES = ("auto", "fast", "float32", "bfloat16", "float16")
PRUNE_SEQUENTIAL_MODES = ("layer", "linear", "auto")  # perp.prune.engine.SEQUENTIAL_MODES (torch-free here)
RECOVER_METHODS = ("bias", "norm", "lm_head", "lora", "masklora", "scalelora", "full")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERN = re.compile(r"^(\d+):(\d+)$")
_LOCAL_TEXT_SUFFIXES = (".txt", ".raw", ".text", ".jsonl", ".json", ".parquet")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- constraints


def _rule(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """A field constraint that fails with perp's one-line message, `message` formatted with the rejected value.
    (pydantic's own `gt`/`lt` would say "Input should be greater than 0" and cannot state a range.)"""

    def check(value: Any) -> Any:
        if value is not None and not ok(value):
            raise ValueError(message.format(value))
        return value

    return AfterValidator(check)


def _one_of(allowed: tuple[str, ...], noun: str) -> AfterValidator:
    return _rule(lambda value: value in allowed, f"unknown {noun} '{{}}' (allowed: {', '.join(allowed)})")


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError(f"must be a number, got {str(value).lower()}")
    return value


_NUMBER = BeforeValidator(_refuse_bool)

# Comparisons are written so that nan fails them.
PositiveInt = Annotated[int, _NUMBER, _rule(lambda v: v > 0, "must be > 0, got {}")]
PositiveIntOrNull = Optional[Annotated[int, _NUMBER, _rule(lambda v: v > 0, "must be > 0 or null, got {}")]]
PositiveFloat = Annotated[float, _NUMBER, _rule(lambda v: v > 0 and math.isfinite(v),
                                                "must be a finite number > 0, got {}")]
NonNegativeFloat = Annotated[float, _NUMBER, _rule(lambda v: v >= 0 and math.isfinite(v),
                                                   "must be a finite number >= 0, got {}")]
FiniteFloat = Annotated[float, _NUMBER, _rule(math.isfinite, "must be a finite number, got {}")]
Fraction = Annotated[float, _NUMBER, _rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1), got {}")]
OpenFraction = Annotated[float, _NUMBER, _rule(lambda v: 0.0 < v < 1.0, "must be in (0, 1), got {}")]


# --------------------------------------------------------------------------------------------- sources


def classify_model_source(spec: str, what: str = "model.name") -> str:
    """Return the kind of a model spec: alias, s3, gguf, local or hub. Raises ConfigError for a missing path,
    naming the setting or option `what` it came from."""
    if spec in MODEL_ALIASES:
        return "alias"
    if spec.startswith("s3://"):
        return "s3"
    path = Path(spec).expanduser()
    if path.exists():
        return "gguf" if path.is_file() and path.suffix == ".gguf" else "local"
    looks_like_path = spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf")
    if not looks_like_path and _HUB_ID.match(spec):
        return "hub"
    raise ConfigError(
        f"{what}: '{spec}' does not exist (allowed: a local Hugging Face directory, a .gguf file, "
        f"an s3:// URI, a Hub id such as org/name, or the alias {', '.join(MODEL_ALIASES)})"
    )


def recorded_model_source(spec: str) -> str:
    """How reports record a model: local paths absolute (the record must resolve from any working directory),
    anything else (alias, Hub id, s3:// URI) as given."""
    if spec in MODEL_ALIASES or spec.startswith("s3://"):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def classify_text_source(spec: str) -> str:
    """Return the kind of a text spec: embedded, hf, s3, text, jsonl or parquet. Missing files are errors."""
    if spec.startswith("embedded:"):
        name = spec.removeprefix("embedded:")
        if name not in EMBEDDED_SPLITS:
            raise ConfigError(f"unknown embedded corpus '{name}' (allowed: {', '.join(EMBEDDED_SPLITS)})")
        return "embedded"
    if spec.startswith("hf:"):
        parts = spec.removeprefix("hf:").split(":")
        if not parts[0] or len(parts) > 4:
            raise ConfigError(f"'{spec}' is not a Hugging Face dataset spec (allowed: "
                              "hf:DATASET[:CONFIG[:SPLIT[:DATA_FILES]]], e.g. "
                              "hf:allenai/c4::train:en/c4-train.00000-of-01024.json.gz)")
        return "hf"
    if spec.startswith("s3://"):
        return _kind_from_suffix(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"'{spec}' is not a file (allowed: a .txt/.raw, .jsonl or .parquet file, "
                          "s3://..., hf:DATASET[:CONFIG[:SPLIT[:DATA_FILES]]] or embedded:NAME)")
    return _kind_from_suffix(spec)


def _kind_from_suffix(spec: str) -> str:
    suffix = Path(spec.split("?")[0]).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """`unstructured` → None; `N:M` → (N, M) with 0 < N < M. Raises ValueError otherwise."""
    if pattern == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError(f"'{pattern}' is not a pattern (allowed: unstructured, or N:M such as 2:4 or 4:8)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"'{pattern}' is not a valid N:M pattern: need 0 < N < M (allowed: unstructured, 2:4, 4:8, ...)")
    return n, m


# --------------------------------------------------------------------------------------------- sections


class ModelConfig(_Section):
    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    revision: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name_exists(cls, value: str) -> str:
        classify_model_source(value)
        return value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", value):
            raise ValueError(f"'{value}' is not a device (allowed: auto, cpu, cuda, cuda:N, mps)")
        return value


class TextSourceConfig(_Section):
    """A text source and how to cut it into token windows."""

    source: str
    text_field: str = "text"
    nsamples: PositiveInt = Field(default=32, description="calibration: number of random windows")
    seqlen: PositiveInt = 512
    seed: int = 0
    max_windows: PositiveIntOrNull = Field(default=None, description="evaluation: cap on non-overlapping windows")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        classify_text_source(value)
        return value


class DataConfig(_Section):
    calibration: TextSourceConfig = TextSourceConfig(source="embedded:wiki-calib", nsamples=32, seqlen=512)
    evaluation: TextSourceConfig = TextSourceConfig(source="embedded:wiki-eval", seqlen=1024, max_windows=32)


class PruneConfig(_Section):
    method: Annotated[str, _one_of(PRUNE_METHODS, "method")] = "wanda"
    sparsity: Fraction = 0.5
    pattern: str = "unstructured"
    granularity: Literal["row", "matrix"] = "row"
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    blocksize: PositiveInt = 128
    percdamp: OpenFraction = 0.01
    # How the engine runs (perp.prune.engine.EngineOptions); `perp prune` flags override these.
    # Precision of the calibration forwards: auto (the weights') or a lower one.
    compute_dtype: Annotated[str, _one_of(PRUNE_COMPUTE_DTYPES, "dtype")] = "auto"
    # Windows per micro-batch; None: ~4096 tokens on CPU, ~16384 on CUDA.
    batch_size: Optional[Annotated[int, _NUMBER,
                                   _rule(lambda v: v > 0, "must be > 0 or null (automatic), got {}")]] = None
    # Calibration tokens that estimate the reconstruction error (0: none).
    error_tokens: Annotated[int, _NUMBER,
                            _rule(lambda v: v >= 0, "must be >= 0 (0: no error estimate), got {}")] = 512
    # layer (reference, two passes) | linear (true-sequential, one pass) | auto
    sequential: Annotated[str, _one_of(PRUNE_SEQUENTIAL_MODES, "mode")] = "layer"
    # OWL (Yin et al., 2024): per-layer sparsity from each layer's share of outlier Wanda scores; 0 = uniform.
    # Layer sparsities lie within sparsity ± 2λ (± λ when the outlier ratios spread evenly).
    owl_lambda: float = 0.0
    owl_m: PositiveFloat = 5.0  # an outlier score exceeds owl_m × the layer's mean score

    @field_validator("pattern")
    @classmethod
    def _pattern_valid(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @model_validator(mode="after")
    def _owl_fits(self) -> "PruneConfig":
        if self.owl_lambda == 0:
            return self
        if self.owl_lambda < 0:
            raise ValueError(f"owl_lambda: must be >= 0 (0: uniform sparsity), got {self.owl_lambda}")
        if self.nm is not None:
            raise ValueError(f"owl_lambda: OWL sets a sparsity per layer, which an N:M pattern ({self.pattern}) fixes; "
                             "use pattern unstructured or owl_lambda 0")
        # layer sparsities lie within sparsity ± 2λ (normalised outlier ratios minus their mean)
        if not (self.sparsity - 2 * self.owl_lambda > 0 and self.sparsity + 2 * self.owl_lambda < 1):
            raise ValueError(f"owl_lambda: layer sparsities can reach sparsity ± 2·owl_lambda = "
                             f"[{self.sparsity - 2 * self.owl_lambda:.3g}, {self.sparsity + 2 * self.owl_lambda:.3g}], "
                             "which must stay inside (0, 1); lower owl_lambda")
        return self

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The sparsity the pattern implies: N:M prunes (M-N)/M of each group, whatever `sparsity` says."""
        nm = self.nm
        return (nm[1] - nm[0]) / nm[1] if nm else self.sparsity


def parse_recover_methods(value: str) -> list[str]:
    """`norm+bias+masklora` → ['norm', 'bias', 'masklora'], each checked against the known methods."""
    names = [part.strip() for part in value.split("+")]
    for name in names:
        if name not in RECOVER_METHODS:
            raise ValueError(f"unknown method '{name}' (allowed: {', '.join(RECOVER_METHODS)}, combined with '+')")
    if len(set(names)) != len(names):
        raise ValueError(f"'{value}' names a method twice")
    lora_kinds = {"lora", "masklora", "scalelora"} & set(names)
    if len(lora_kinds) > 1:
        raise ValueError(f"'{value}' combines {' and '.join(sorted(lora_kinds))}; choose one LoRA form")
    if "full" in names and len(names) > 1:
        raise ValueError("'full' already trains every weight; it cannot be combined")
    return names


class RecoverConfig(_Section):
    method: str = "norm"
    mode: Literal["end2end", "layerwise"] = "end2end"
    steps: PositiveInt = 20
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 2
    grad_accum: PositiveInt = 1
    seqlen: PositiveInt = 256
    rank: Annotated[int, _NUMBER, _rule(lambda v: v > 0, "LoRA rank must be > 0, got {}")] = 16
    alpha: PositiveFloat = 32.0
    weight_decay: NonNegativeFloat = 0.0
    warmup_fraction: Fraction = 0.1
    gradient_checkpointing: bool = False
    seed: int = 0
    data: Optional[TextSourceConfig] = None  # None: the calibration source

    @field_validator("method")
    @classmethod
    def _known_methods(cls, value: str) -> str:
        parse_recover_methods(value)
        return value

    @property
    def methods(self) -> list[str]:
        return parse_recover_methods(self.method)


class ZeroShotConfig(_Section):
    tasks: list[str] = Field(default_factory=list)
    task_data: Optional[str] = None
    limit: Optional[Annotated[int, _NUMBER, _rule(lambda v: v > 0, "must be > 0, got {}")]] = None
    batch_size: PositiveInt = 8

    @field_validator("task_data")
    @classmethod
    def _dir_exists(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(f"'{value}' is not a directory")
        return value


class PerplexityTextConfig(TextSourceConfig):
    name: str


class EvaluateConfig(_Section):
    perplexity: list[PerplexityTextConfig] = Field(
        default_factory=lambda: [
            PerplexityTextConfig(name="wiki-eval", source="embedded:wiki-eval", seqlen=1024, max_windows=32)
        ]
    )
    zeroshot: ZeroShotConfig = ZeroShotConfig()
    batch_size: PositiveInt = 4
    # Perplexity with one decoder layer on the device at a time (the weights stay on CPU): for models larger
    # than the device. Same numbers. Zero-shot scoring needs the whole model on the device, so not with this.
    offload: bool = False

    @model_validator(mode="after")
    def _unique_names(self) -> "EvaluateConfig":
        names = [text.name for text in self.perplexity]
        if len(set(names)) != len(names):
            raise ValueError(f"perplexity text names must be unique, got {names}")
        if self.offload and self.zeroshot.tasks:
            raise ValueError("offload: true evaluates perplexity layer by layer; zero-shot tasks need the whole "
                             "model on the device (set evaluate.zeroshot.tasks: [] or evaluate.offload: false)")
        return self


class GatesConfig(_Section):
    max_ppl_ratio: Optional[PositiveFloat] = 1.25
    max_zeroshot_drop: Optional[FiniteFloat] = 2.0  # points of mean accuracy; negative: must improve on dense
    min_sparsity: Optional[Fraction] = None  # None: the pruning target


def _in_dvc_temp_workspace(directory: Path) -> bool:
    """`dvc exp run --temp` / `--queue` run in a copy of the repository under .dvc/tmp/exps/, removed afterwards."""
    parts = directory.resolve().parts
    return any(parts[i:i + 3] == (".dvc", "tmp", "exps") for i in range(len(parts) - 2))


def absolute_store(uri: str) -> str:
    """A local store as an absolute path (what a record must say: relative paths depend on the working
    directory); s3:// as it is."""
    if uri.startswith("s3://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().absolute())


class RegisterConfig(_Section):
    store: str = "./perp-store"
    name: str = "smollm2-135m-perp"
    stages: list[str] = Field(default_factory=lambda: ["dev", "staging", "prod"])
    gates: dict[str, GatesConfig] = Field(default_factory=lambda: {"prod": GatesConfig()})

    @field_validator("store")
    @classmethod
    def _valid_store(cls, value: str) -> str:
        """The store's own URI rules (scheme, bucket name, key prefix), and a local root that can be a directory,
        checked here so that a typo fails before the pipeline runs, not at its last stage."""
        if "://" in value and not value.startswith(("s3://", "file://")):
            scheme = value.split("://", 1)[0]
            raise ValueError(f"unknown store scheme '{scheme}://' (allowed: s3://, file://, or a local path)")
        from perp.store import StoreError, open_store

        try:
            store = open_store(value)
        except StoreError as error:
            raise ValueError(str(error)) from None
        root = getattr(store, "root", None)
        if root is not None:
            existing = Path(root).expanduser().absolute()
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise ValueError(f"'{value}' cannot be a directory: '{existing}' is a file")
            relative = not Path(value.removeprefix("file://")).expanduser().is_absolute()
            if relative and _in_dvc_temp_workspace(Path.cwd()):
                raise ValueError(f"'{value}' is relative, and this runs in a temporary DVC experiment workspace "
                                 f"({Path.cwd()}) that DVC deletes afterwards, with the versions registered into "
                                 "it; use an absolute path or s3://")
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        from perp.registry.names import RegistryError, validate_name

        try:
            return validate_name(value)  # the registry's own rule: the name becomes a store key
        except RegistryError as error:
            raise ValueError(str(error)) from None

    @field_validator("stages")
    @classmethod
    def _valid_stages(cls, value: list[str]) -> list[str]:
        from perp.registry.names import RegistryError, validate_stages

        try:
            return validate_stages(value)  # what promote will accept: no 'latest', a letter first, distinct
        except RegistryError as error:
            raise ValueError(str(error)) from None

    @model_validator(mode="after")
    def _gates_name_stages(self) -> "RegisterConfig":
        unknown = set(self.gates) - set(self.stages)
        if unknown:
            raise ValueError(f"gates name unknown stage(s) {sorted(unknown)} (allowed: {', '.join(self.stages)})")
        return self


with warnings.catch_warnings():
    # `register` is the params.yaml section name; it only shadows ABCMeta.register, which nothing here uses.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class PerpConfig(_Section):
        model: ModelConfig = ModelConfig()
        data: DataConfig = DataConfig()
        prune: PruneConfig = PruneConfig()
        recover: RecoverConfig = RecoverConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        register: RegisterConfig = RegisterConfig()


# --------------------------------------------------------------------------------------------- loading


def _format_validation_error(error: ValidationError, prefix: str = "") -> str:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    key = ".".join(p for p in (prefix, loc) if p)
    ctx_error = first.get("ctx", {}).get("error")
    if isinstance(ctx_error, ConfigError):
        message = str(ctx_error)
        # A nested classify_* error already carries its own key for model.name; keep it, otherwise prefix ours.
        return message if message.startswith(key) else f"{key}: {message}"
    if ctx_error is not None:
        message = str(ctx_error)
    elif first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "literal_error":
        message = f"got {first['input']!r}; {first['msg'].lower()}"
    else:
        message = f"{first['msg'].lower()}, got {first.get('input')!r}"
    return f"{key}: {message}"


def validate_section(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, prefix)) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 sexagesimal ints, so an unquoted `2:4` stays the string '2:4', not 124."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`prune.sparsity=0.6` → (['prune', 'sparsity'], 0.6). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. prune.sparsity=0.6")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': malformed key '{key}'")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        parts, value = parse_override(override)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{override}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_params(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> PerpConfig:
    """Read params.yaml (if given), apply dotted overrides and validate everything at once."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file '{path}' does not exist")
        try:
            loaded = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"params file '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"params file '{path}' must be a mapping of sections")
        data = loaded
    # Defaults first, so that a partial params.yaml or a dotted override deep inside a section is enough.
    data = _deep_merge(PerpConfig().model_dump(mode="json"), data)
    apply_overrides(data, overrides or [])
    return validate_section(PerpConfig, data)


def dump_params(config: PerpConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")

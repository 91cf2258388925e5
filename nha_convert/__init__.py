"""nha-convert: turn pretrained Llama / Qwen2 / Qwen3 / Mistral models into Native Hybrid Attention models.

Importing the package registers the `nha_*` model types with transformers' Auto classes.
"""

from .cache import NHACache
from .convert import convert, supported_model_types
from .decode_graph import generate_fast
from .errors import NHAError
from .io import save
from .layer import NHAAttention
from .loading import load
from .modeling import ARCHITECTURES
from .settings import NHASettings

__all__ = [
    "ARCHITECTURES", "NHAAttention", "NHACache", "NHAError", "NHASettings",
    "convert", "generate_fast", "load", "save", "supported_model_types",
]
__version__ = "0.1.0"

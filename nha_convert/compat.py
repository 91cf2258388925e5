"""What differs between the supported transformers versions (pyproject.toml states the range), in one place.

transformers 5.24 renamed the cache argument of models and attention modules from `past_key_values` to `cache`
(the old name is a deprecated alias until 5.40) and model outputs carry it as `.cache`. Everything in this
package passes and reads the cache through the two names below, so the next rename is a one-line change here,
and a layer that is handed a cache under a name it does not know fails loudly (layer.py) instead of decoding
without context.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LlamaModel

# The keyword under which this transformers version hands the cache to models, decoder layers and attention.
CACHE_KWARG: str = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values")  # every name a caller may use (the old one too)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from `kwargs` under either name and return it (None when absent); both at once is an error."""
    given = [c for c in (kwargs.pop(name, None) for name in CACHE_KWARGS) if c is not None]
    if len(given) > 1:
        raise TypeError("pass the cache once, as `cache=` or as `past_key_values=`, not both")
    return given[0] if given else None


def output_cache(output: Any) -> Any:
    """The cache a model returned, whatever this version calls the output field."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)

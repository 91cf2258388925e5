"""nha-convert: turn pretrained Llama / Qwen2 / Qwen3 / Mistral models into Native Hybrid Attention models.

The `nha_*` model types are registered with transformers' Auto classes whenever transformers is in use: at once if
transformers is already imported, else the moment it is (an import hook), so `import nha_convert` then
`AutoModelForCausalLM.from_pretrained(folder)` works as before. The public names below load on first use: the
commands' `--help` and `--version` then start without torch and transformers (well under a second).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

# public name -> the module that defines it
_LAZY = {
    "NHACache": "cache", "convert": "convert", "supported_model_types": "convert", "generate_fast": "decode_graph",
    "NHAError": "errors", "save": "io", "NHAAttention": "layer", "load": "loading", "ARCHITECTURES": "modeling",
    "NHASettings": "settings",
}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """`nha_convert.convert` is the function, as the eager imports made it: importing the submodule of the same
    name sets the package attribute to the module afterwards, which would shadow the lazy name for good."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Imports `nha_convert.modeling` (which registers the model types) once transformers is imported, at the end of
    the outermost import of this package's modules then running (a module that modeling itself imports may be the
    one importing transformers: registering inside it would find it half-initialised)."""

    def __init__(self) -> None:
        self.depth = 0  # this package's modules being executed, nested
        self.pending = False  # transformers is imported, the types are not registered yet

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers" and not name.startswith(f"{__name__}."):
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     and (s := f.find_spec(name, path, target)) is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            self.depth += 1
            try:
                exec_module(module)
            finally:
                self.depth -= 1
            self.pending = self.pending or name == "transformers"
            if self.pending and self.depth == 0:
                self.pending = False
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                importlib.import_module(f"{__name__}.modeling")

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    importlib.import_module(f"{__name__}.modeling")
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())

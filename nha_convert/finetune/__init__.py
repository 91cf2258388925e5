"""`nha-finetune`: recover the quality a conversion cost with a short, staged, resumable recipe.

    from nha_convert.finetune import read_recipe, train
    final_folder = train(read_recipe("recipes/smollm2-135m.yaml", budget="cpu"))

Modules: recipe (schema + validation), data (sources, rows, held-out split), losses, trainables (what trains),
models (student / teacher), trainer (loop, checkpoints, resume, Ctrl-C), progress (display + metrics log).
"""

from .recipe import Recipe, parse_recipe, read_recipe
from .trainer import Interrupted, Trainer, train

__all__ = ["Interrupted", "Recipe", "Trainer", "parse_recipe", "read_recipe", "train"]

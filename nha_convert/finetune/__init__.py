"""`nha-finetune`: recover the quality a conversion cost with a short, staged, resumable recipe.

    from nha_convert.finetune import read_recipe, train
    final_folder = train(read_recipe("recipes/smollm2-135m.yaml", budget="cpu"))

Modules: schema (the recipe's typed models, on spec's base; sources: one class per data-source kind) and recipe
(YAML with lines, budgets, --set), data (each source's documents from nha_convert/corpora, packed rows, held-out
split), objectives (one class per stage kind: its loss, teacher pass, reported values; the sums in
nha_convert/losses.py), trainables (what trains), models (student / teacher), attention_hooks, distributed, budget
(steps or minutes), checkpoints (save, verify, resume), probe (recall after each stage), trainer (the stage
lifecycle, Ctrl-C), progress (display + metrics log).
benchmarks/compare.py runs a recipe against the base model and sliding window.
"""

from .recipe import Recipe, parse_recipe, read_recipe
from .trainer import Interrupted, Trainer, train

__all__ = ["Interrupted", "Recipe", "Trainer", "parse_recipe", "read_recipe", "train"]

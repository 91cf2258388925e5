"""`nha-finetune RECIPE.yaml`: recover the quality a conversion cost, with a short staged recipe.

Run it as is on one device, or under `accelerate launch` for several GPUs (DDP, or FSDP with
recipes/accelerate-fsdp.yaml). Ctrl-C saves a checkpoint; `--resume` continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import console as err
from .common import run_app

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help=__doc__.split("\n\n")[0])


@app.command(help=__doc__)
def finetune(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/ and docs/recipes.md)."),
    budget: str = typer.Option("auto", "--budget", "-b",
                               help="Named budget of the recipe (e.g. cpu, gpu); auto = gpu when a GPU is visible "
                                    "and the recipe has one, else cpu; none = the stages as written."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (overrides output.dir)."),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="FIELD=VALUE",
                                   help="Override one recipe field, e.g. --set stages.distill.steps=20 "
                                        "--set model.nha.window=128 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a non-empty run folder and start over."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe, print the resolved stages, and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log data loading and backend choices."),
) -> None:
    from ..finetune.recipe import read_recipe, stage_name

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    overrides = list(set_)
    if output is not None:
        overrides.append(f"output.dir={output}")
    r = read_recipe(recipe, budget=None if budget == "none" else budget, overrides=overrides)
    if check:
        err.print(f"recipe {recipe} is valid (budget: {r.budget or 'none'}); run folder {r.output.dir}")
        for i, s in enumerate(r.stages):
            amount = (f"{s.steps} steps" if s.steps is not None else
                      f"{s.tokens:,} tokens" if s.tokens is not None else f"{s.minutes:g} minutes")
            err.print(f"  {i}: {stage_name(s)} ({s.kind}), trains {s.trains}, {amount}, batch {s.batch_size} x "
                      f"accum {s.grad_accum}, seq_len {s.seq_len}, lr {s.lr:g} {s.schedule}"
                      f"{', bf16' if s.bf16 else ''}", highlight=False)
        return
    from ..finetune.trainer import Interrupted, Trainer

    try:
        final = Trainer(r, resume=resume, overwrite=overwrite, console=err).run()
    except Interrupted as stop:
        err.print(f"interrupted after step {stop.global_step}; checkpoint {stop.checkpoint}; "
                  f"continue with: nha-finetune {recipe} --resume" + (f" -o {output}" if output else ""))
        sys.exit(130)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process under accelerate launch
        typer.echo(str(final))


main = run_app(app)

if __name__ == "__main__":
    main()

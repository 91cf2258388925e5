"""`nha-finetune RECIPE.yaml`: recover the quality a conversion cost, with a short staged recipe.

Run it as is on one device, or under `accelerate launch` for several GPUs (DDP, or FSDP with
recipes/accelerate-fsdp.yaml). Ctrl-C or SIGTERM saves a checkpoint; `--resume` continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import NHAError
from .common import VersionOption, run_app
from .common import console as err

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help=__doc__.split("\n\n")[0])

EXAMPLES = """
[b]Examples[/b]

  nha-finetune recipes/smollm2-135m.yaml --budget cpu        [dim]# a few steps on 2 CPU cores[/]
  nha-finetune recipes/smollm2-135m.yaml --budget gpu -o runs/a
  nha-finetune recipes/smollm2-135m.yaml --resume -o runs/a   [dim]# after Ctrl-C or a crash[/]
  nha-finetune recipes/smollm2-135m.yaml --check --set stages.distill.steps=20
  accelerate launch --num_processes 2 -m nha_convert.cli.finetune recipes/smollm2-135m.yaml --budget gpu
"""


def _model_config(name: str | None, field: str) -> Any:
    """A recipe model's config (no weights), its local weight files checked first."""
    from .. import hub
    from ..io import check_weights

    source = hub.resolve_source(name)
    if isinstance(source, Path):
        check_weights(source)
    try:
        return hub.load_config(name)
    except (OSError, ValueError) as e:
        raise NHAError(f"{field}: cannot read the config of {name} ({str(e).splitlines()[0][:200]})") from None


def preflight(r: Any) -> None:
    """Every check that needs no model weights, before any are loaded: run folder writable, data files present,
    model folders intact, each stage's seq_len within the model's context length."""
    from ..io import check_writable

    check_writable(r.output.dir, "run folder")
    for i, src in enumerate(r.data.sources):
        if src.kind in ("text", "jsonl"):
            p = Path(src.path).expanduser()
            if not p.exists() or (src.kind == "jsonl" and not p.is_file()):
                raise NHAError(f"{r.source}: data.sources[{i}]: data file {p} not found")
            if p.is_dir() and next(p.rglob("*.txt"), None) is None:
                raise NHAError(f"{r.source}: data.sources[{i}]: data folder {p} holds no .txt files")
    m = r.model
    models = [("model.converted", m.converted) if m.converted is not None else ("model.base", m.base)]
    if r.teacher.model not in (None, "base"):
        models.append(("teacher.model", r.teacher.model))
    for field, name in models:
        cfg = _model_config(name, field)
        limit = getattr(cfg, "max_position_embeddings", None)
        for s in r.stages:
            if limit is not None and s.seq_len > limit:
                from ..finetune.recipe import stage_name

                raise NHAError(f"{r.source}: stage {stage_name(s)}: seq_len {s.seq_len} tokens exceeds the context "
                               f"length of {field} {name or 'smollm2-135m'} ({limit} tokens); lower seq_len")


def _remove_unused_run_dir(run_dir: Path) -> None:
    """After a failed or interrupted start: a run folder with no checkpoint and no model is only clutter."""
    from ..finetune.checkpoints import checkpoint_dirs

    if run_dir.is_dir() and not checkpoint_dirs(run_dir) and not (run_dir / "model").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def _resume_command(recipe: Path, output: Path | None) -> str:
    return f"nha-finetune {recipe} --resume" + (f" -o {output}" if output else "")


@app.command(help=__doc__, epilog=EXAMPLES)
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
    version: VersionOption = False,
) -> None:
    from ..finetune.recipe import read_recipe, stage_name

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    overrides = list(set_)
    if output is not None:
        overrides.append(f"output.dir={output}")
    r = read_recipe(recipe, budget=None if budget == "none" else budget, overrides=overrides)
    if check:  # every check the run makes before training, so a recipe --check passes is one the run starts
        preflight(r)
        from ..finetune.checkpoints import check_run_dir

        check_run_dir(Path(r.output.dir), resume=resume, overwrite=overwrite)
        err.print(f"recipe {recipe} is valid (budget: {r.budget or 'none'}); run folder {r.output.dir}")
        for i, s in enumerate(r.stages):
            amount = (f"{s.steps} steps" if s.steps is not None else
                      f"{s.tokens:,} tokens" if s.tokens is not None else f"{s.minutes:g} minutes")
            err.print(f"  {i}: {stage_name(s)} ({s.kind}), trains {s.trains}, {amount}, batch {s.batch_size} x "
                      f"accum {s.grad_accum}, seq_len {s.seq_len}, lr {s.lr:g} {s.schedule}"
                      f"{', bf16' if s.bf16 else ''}", highlight=False)
        return
    preflight(r)
    from ..runlock import RunLock

    run_dir = Path(r.output.dir)
    main_process = os.environ.get("RANK", "0") == "0"  # one lock per run, taken by the main process
    with RunLock(run_dir) if main_process else nullcontext():
        from ..finetune.checkpoints import check_run_dir, checkpoint_dirs
        from ..io import OutOfSpace

        check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # under the lock, before the models load
        fresh = not resume and (overwrite or not run_dir.exists())
        err.print(f"run folder {run_dir}: loading models", highlight=False)
        from ..finetune.trainer import STOP_SIGNALS, Interrupted, Trainer

        started = time.perf_counter()
        try:
            final = Trainer(r, resume=resume, overwrite=overwrite, console=err).run()
        except Interrupted as stop:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)  # stopping anyway: a late second signal must not hit atexit
            err.print(f"interrupted after step {stop.global_step}; checkpoint {stop.checkpoint}; "
                      f"continue with: {_resume_command(recipe, output)}", highlight=False, soft_wrap=True)
            sys.exit(128 + stop.signum)  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports them
        except OutOfSpace as e:
            if fresh and main_process:
                _remove_unused_run_dir(run_dir)
            if not checkpoint_dirs(run_dir):
                raise
            raise NHAError(f"{e}; then continue with: {_resume_command(recipe, output)}") from None
        except BaseException:
            if fresh and main_process:
                _remove_unused_run_dir(run_dir)
            raise
    if os.environ.get("RANK", "0") == "0":  # once, not once per process under accelerate launch
        from ..finetune.budget import SMOKE, smoke_cost

        if r.budget == SMOKE:  # a hardware check: what the full recipe would cost here (finetune/budget.py)
            err.print(smoke_cost(recipe, overrides, run_dir, time.perf_counter() - started), highlight=False,
                      soft_wrap=True)
        typer.echo(str(final))


main = run_app(app, "nha-finetune")

if __name__ == "__main__":
    main()

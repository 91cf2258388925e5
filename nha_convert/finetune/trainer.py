"""The training loop: stages in order, accelerate for one or many GPUs, atomic checkpoints, exact resume, stop signals.

Batches: the rows of global step i are a pure function of (seed, stage, i) (data.step_rows). Each global batch is
split into grad_accum micro-steps x devices; every loss is a token SUM divided by the token count of the whole
global batch, so one GPU and N GPUs at the same global batch compute the same loss and gradient.

Checkpoints (run_dir/checkpoints/step-XXXXXXXX-stageS) hold the full training state through accelerate's
save_state (weights of the model being trained, optimizer, the RNG of every process) plus the scheduler and the
position (stage, step). One is written when a stage starts, every `checkpoint_every` steps, and on Ctrl-C or SIGTERM
(`timeout`, `kill`, a scheduler's preemption). They are written into a temporary folder and renamed into place, so
the latest complete one is always usable; `--resume` continues from it and gives the same fp32 weights as a run that
was never stopped.

Each stage goes through setup (trainables, optimizer, the objective of its kind, its step budget, resume), train
(the step loop) and finish (gather, merge LoRA); objectives.py holds what differs between stage kinds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from torch import Tensor, nn

from ..errors import NHAError
from .attention_hooks import freeze_unused_gates
from .budget import StepBudget, lr_factor
from .checkpoints import (Position, checkpoint_dirs, forget_optimizer_state, load_checkpoint, read_position,
                          save_checkpoint, start_run_dir)
from .data import Corpus, Rows, build_corpus, step_rows
from .distributed import is_fsdp, micro_batches, reduce, unshard
from .objectives import Objective, StageLoss, objective_for
from .probe import stage_end_probe
from .progress import MetricsLog, StageProgress
from .recipe import Recipe, StageSpec, stage_name
from .trainables import causal_lm, count_parameters, is_gate, merge_lora, select_trainables
from .windows import check_windows, draw_layer_windows, training_window, windowed_layers


log = logging.getLogger("nha_convert.finetune")
# Tied embeddings are saved once and re-tied on load (the resume test checks it): no need to warn each time.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# Stop signals: Ctrl-C, and SIGTERM (what `timeout`, `kill`, SLURM preemption and container shutdowns send).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was saved (its path is the message's subject); `signum` says which signal."""

    def __init__(self, checkpoint: Path | None, global_step: int, signum: int = signal.SIGINT):
        super().__init__(str(checkpoint))
        self.checkpoint, self.global_step, self.signum = checkpoint, global_step, signum


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last call (GiB), for the metrics log; nothing on CPU."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 1024**3
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_mem_gib": round(peak, 2)}


@dataclass
class StageRun:
    """One stage being trained: what setup builds and the loop and finish read."""

    idx: int
    stage: StageSpec
    name: str
    objective: Objective
    budget: StepBudget
    student: nn.Module  # the model inside `module` (the one unwrap_model gives back)
    module: nn.Module | None  # StageLoss as accelerate prepared it; None once the stage is finished
    optimizer: Any
    scheduler: Any
    pos: Position
    train: Rows
    held: Rows
    global_batch: int


class Trainer:
    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None, models: tuple[nn.Module, nn.Module | None, Any] | None = None,
                 documents: Callable[[], list[str]] | None = None,
                 step_callback: Callable[[int], None] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.recipe = recipe
        self.run_dir = Path(recipe.output.dir)
        self.console = console or Console(stderr=True)
        self.accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.resume = resume
        self.overwrite = overwrite
        self._models = models
        self._documents = documents
        self.step_callback = step_callback  # tests: called after every optimizer step with the global step
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.main)
        self._stop: int | None = None  # the stop signal received, if any

    # -- set-up --

    def _check_run_dir(self) -> Path | None:
        ckpt, damaged = start_run_dir(self.accelerator, self.run_dir, resume=self.resume, overwrite=self.overwrite)
        if damaged and self.main:
            self.console.print(f"[yellow]skipping damaged checkpoint(s) "
                               f"{', '.join(f'{p.name} ({why})' for p, why in damaged)}: resuming from the "
                               f"previous intact one, {ckpt.name}; delete the damaged folder(s)", highlight=False)
        return ckpt

    def _autocast(self, stage: StageSpec) -> Callable[[], Any]:
        return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=stage.bf16)

    def _setup_models(self) -> tuple[nn.Module, nn.Module | None, Any, Corpus]:
        recipe, acc = self.recipe, self.accelerator
        if self._models is not None:
            student, teacher, tokenizer = self._models
            student.to(self.device)
            if teacher is not None:
                teacher.to(self.device)
        else:
            from .models import build_models

            student, teacher, tokenizer = build_models(recipe, self.device)
        if self.main:
            self.console.print(f"student: {type(student).__name__}, {sum(p.numel() for p in student.parameters()):,} "
                               f"parameters; teacher: {type(teacher).__name__ if teacher is not None else 'none'}")
        # Teacher samples are drawn once (main process) and cached in the run folder for the others and for resume.
        sampled = any(s.kind == "teacher" for s in recipe.data.sources)
        if sampled and not self.main:
            acc.wait_for_everyone()
        corpus = build_corpus(recipe.data, tokenizer, seed=recipe.seed, teacher=teacher,
                              cache_dir=self.run_dir / "data", documents=self._documents)
        if sampled and self.main:
            acc.wait_for_everyone()
        return student, teacher, tokenizer, corpus

    # -- checkpoints --

    def _save(self, pos: Position, scheduler: Any, student: nn.Module, name: str) -> Path:
        if not self._finite_trainables(student):  # never a checkpoint of NaN weights
            self._stop_non_finite(name, pos.step, "the trained weights")
        return save_checkpoint(self.accelerator, self.run_dir, pos, scheduler,
                               {"recipe": self.recipe.source, "budget": self.recipe.budget},
                               self.recipe.output.keep_checkpoints)

    # -- non-finite values: stop with one line, keep the last good checkpoint --

    def _finite_trainables(self, student: nn.Module) -> bool:
        bad = any(not torch.isfinite(getattr(p, "_local_tensor", p)).all() for p in student.parameters()
                  if p.requires_grad)  # the local shard under FSDP; all processes agree through the max
        return not reduce(self.accelerator, torch.tensor([float(bad)], device=self.device), "max").item()

    def _stop_non_finite(self, stage: str, step: int, what: str) -> None:
        kept = checkpoint_dirs(self.run_dir)
        last = (f"the last good checkpoint, {kept[-1].name}, is kept: lower the lr (or check the model and data) "
                f"and continue with --resume") if kept else "no checkpoint was saved: lower the lr or check the data"
        raise NHAError(f"stage {stage}: {what} became non-finite (NaN or inf) at step {step}; training "
                       f"stopped without saving; {last}")

    # -- Ctrl-C and SIGTERM --

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._stop = signum
        signal.signal(signum, self._old_handlers[signum])  # a second one stops at once
        if self.main:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.console.print(f"[yellow]{name}: finishing this step, saving a checkpoint (again to abort)")

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop is not None else 0.0], device=self.device)
        return bool(reduce(self.accelerator, flag, "max").item())

    # -- main --

    def run(self) -> Path:
        acc = self.accelerator
        ckpt = self._check_run_dir()
        start = read_position(ckpt) if ckpt is not None else None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if start is not None:
                self.metrics.truncate_after(start.global_step)
                self.console.print(f"resuming from {ckpt} (stage {start.stage}, step {start.step})")

        torch.manual_seed(self.recipe.seed)
        student, teacher, tokenizer, corpus = self._setup_models()

        self._old_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        in_main_thread = True
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_stop_signal)
        except ValueError:  # not the main thread (some test runners): no Ctrl-C handling
            in_main_thread = False
        try:
            pos = Position(global_step=start.global_step, tokens=start.tokens) if start else Position()
            for idx, stage in enumerate(self.recipe.stages):
                if start is not None and idx < start.stage:
                    continue
                resume_from = ckpt if start is not None and idx == start.stage else None
                stage_run = self._setup_stage(idx, stage, student, teacher, corpus, pos, resume_from)
                self._train(stage_run, teacher)
                student, pos = self._finish_stage(stage_run)
                del stage_run  # nothing of the finished stage outlives it
                stage_end_probe(self, student, tokenizer, stage_name(stage), pos.global_step)  # recipe.probe
        finally:
            if in_main_thread:
                for sig, old in self._old_handlers.items():
                    signal.signal(sig, old)

        final = self.run_dir / "model"
        if self.main:
            import nha_convert

            student.eval()
            nha_convert.save(student, tokenizer, final, overwrite=True)
            (self.run_dir / "DONE").write_text(json.dumps(asdict(pos)) + "\n")
            self.console.print(f"[green]saved {final}")
        acc.wait_for_everyone()
        acc.end_training()  # tears the process group down cleanly under accelerate launch
        self.student = student
        return final

    # -- one stage: setup, train, finish --

    def _setup_stage(self, idx: int, stage: StageSpec, student: nn.Module, teacher: nn.Module | None,
                     corpus: Corpus, pos: Position, resume_from: Path | None) -> StageRun:
        acc, recipe = self.accelerator, self.recipe
        name = stage_name(stage)
        objective = objective_for(stage)
        budget = StepBudget(stage, self.world)
        G = stage.batch_size * stage.grad_accum * self.world
        train, held = corpus.rows(stage.seq_len, "train"), corpus.rows(stage.seq_len, "held_out")
        if len(train) < G or held.tokens == 0:  # tiny data: refuse rather than train on repeats of a few rows
            raise NHAError(f"stage {name}: the data gives {len(train)} training row(s) and {held.tokens} held-out "
                           f"token(s) of {stage.seq_len}-token rows; a step needs {G} rows (batch_size x grad_accum "
                           "x devices) and the held-out split needs tokens: add data or lower seq_len / batch_size")
        if objective.needs_teacher and teacher is None:
            raise NHAError(f"stage {name} ({stage.kind}) needs a teacher")
        check_windows(student, name, stage.windows or stage.window_dropout)

        student = select_trainables(student, stage.trains, stage.lora,
                                    fp32_trainables=recipe.model.dtype == "bfloat16")
        freeze_unused_gates(student)
        if not any(p.requires_grad for p in student.parameters()):
            raise NHAError(f"stage {name}: trains: {stage.trains} leaves nothing to train in this model "
                           "(no NHA gates outside full-attention layers); use trains: lora or attention")
        if stage.gradient_checkpointing:
            kwargs: dict[str, Any] = {"use_reentrant": False}
            if hasattr(objective, "checkpoint_contexts"):  # attention transfer: hooks active in the recompute too
                kwargs["context_fn"] = objective.checkpoint_contexts
            causal_lm(student).gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        trainable, n_params = count_parameters(student)
        gates = [p for n, p in student.named_parameters() if p.requires_grad and is_gate(n)]
        others = [p for n, p in student.named_parameters() if p.requires_grad and not is_gate(n)]
        groups = [{"params": g, "lr": lr} for g, lr in ((others, stage.lr), (gates, stage.gate_lr or stage.lr)) if g]
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)
        module, optimizer = acc.prepare(StageLoss(student, stage, teacher, objective), optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(stage, budget))

        if resume_from is not None:
            pos = load_checkpoint(acc, resume_from, scheduler)
            if pos.total is not None:
                budget.fix(pos.total)
        else:
            pos = Position(stage=idx, step=0, global_step=pos.global_step, tokens=pos.tokens, total=budget.planned)
            if recipe.output.checkpoint_every > 0:
                self._save(pos, scheduler, student, name)
        if pos.step == 0:
            forget_optimizer_state(optimizer)
        amount = (f"{stage.minutes} min" if budget.planned is None and pos.total is None
                  else f"{budget.steps} steps")
        if self.main:
            self.console.print(f"[bold]stage {idx} {name}[/] ({stage.kind}): trains {stage.trains}, "
                               f"{trainable:,} of {n_params:,} parameters; {amount} x {G} rows x "
                               f"{stage.seq_len} tokens; {len(train)} training rows, {len(held)} held-out rows")
        run = StageRun(idx, stage, name, objective, budget, acc.unwrap_model(module).student, module, optimizer,
                       scheduler, pos, train, held, G)
        if resume_from is None:
            self.metrics.write(event="stage_start", stage=name, global_step=pos.global_step, steps=pos.total,
                               minutes=stage.minutes, global_batch=G, seq_len=stage.seq_len, trainable=trainable,
                               devices=self.world, padding_frac=round(train.padding_frac, 4))
            self._evaluate(run, teacher)
        return run

    def _train(self, run: StageRun, teacher: nn.Module | None) -> None:
        """The step loop, until the budget is spent (or Ctrl-C, which saves and raises Interrupted)."""
        recipe, stage, name, pos, budget = self.recipe, run.stage, run.name, run.pos, run.budget
        seed = recipe.seed * 1009 + run.idx
        autocast = self._autocast(stage)
        budget.start()
        logged = [0, 0]  # real tokens, positions since the last log line (its padding_frac)
        run.module.train()
        layers = windowed_layers(run.student)  # once a stage: the model does not change
        with StageProgress(self.console, f"{run.idx}:{name}", pos.total or 0, pos.step, self.main,
                           recipe.output.log_every) as bar:
            while budget.left(pos.step) > 0:
                rows = step_rows(len(run.train), run.global_batch, pos.step, seed)
                with training_window(layers, draw_layer_windows(stage, layers, seed, pos.step)):
                    stats, step_tokens, denom = self._train_step(run, teacher, rows, autocast)
                run.scheduler.step()
                pos.step += 1
                pos.global_step += 1
                pos.tokens += step_tokens
                logged[0] += step_tokens
                logged[1] += len(rows) * stage.seq_len
                loss = run.objective.stage_loss_value(stats, denom)
                if not math.isfinite(loss):
                    self._stop_non_finite(name, pos.step, f"the loss ({loss})")
                if pos.total is None and budget.timing_done(pos.step):  # a time budget: fix the step count
                    pos.total = self._steps_for_time(run)
                    budget.fix(pos.total)
                    bar.set_total(pos.total)
                    self.metrics.write(event="steps_fixed", stage=name, global_step=pos.global_step,
                                       steps=pos.total, minutes=stage.minutes)
                bar.update(pos.step, loss, step_tokens)
                if pos.step % recipe.output.log_every == 0 or budget.left(pos.step) == 0:
                    self.metrics.write(stage=name, step=pos.step, global_step=pos.global_step, loss=loss,
                                       lr=run.scheduler.get_last_lr()[0], tokens=pos.tokens,
                                       tokens_per_s=round(bar.tokens_per_s(), 1),
                                       padding_frac=round(1 - logged[0] / max(1, logged[1]), 4),
                                       time_s=round(budget.elapsed(), 3), **_peak_memory(self.device))
                    logged = [0, 0]
                if stage.eval_every and pos.step % stage.eval_every == 0 and budget.left(pos.step) > 0:
                    self._evaluate(run, teacher)
                    run.module.train()
                if self.step_callback is not None:
                    self.step_callback(pos.global_step)
                if self._should_stop():
                    path = self._save(pos, run.scheduler, run.student, name)
                    raise Interrupted(path, pos.global_step, self._stop or signal.SIGINT)
                every = recipe.output.checkpoint_every
                if every and pos.step % every == 0 and budget.left(pos.step) > 0:
                    self._save(pos, run.scheduler, run.student, name)
                if budget.past_deadline():
                    bar.note(f"stage {name}: time limit of {stage.max_minutes} min reached at step {pos.step}")
                    break
        self._evaluate(run, teacher)

    def _finish_stage(self, run: StageRun) -> tuple[nn.Module, Position]:
        """The trained student as a plain model (gathered under FSDP, LoRA merged, frozen, in the recipe's dtype)
        and the position at the start of the next stage."""
        acc, stage, student = self.accelerator, run.stage, run.student
        if is_fsdp(acc):
            student = unshard(run.module, student, stage, self.recipe.model.dtype, self.device)
        acc.free_memory()
        run.module = run.optimizer = run.scheduler = None  # free the optimizer state before merging and casting
        if stage.gradient_checkpointing:
            causal_lm(student).gradient_checkpointing_disable()
        student = merge_lora(student)
        for p in student.parameters():
            p.requires_grad_(False)
        if self.recipe.model.dtype == "bfloat16":
            for p in student.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        return student, Position(stage=run.idx + 1, step=0, global_step=run.pos.global_step, tokens=run.pos.tokens)

    def _steps_for_time(self, run: StageRun) -> int:
        """Step count that fills the stage's time budget, from the time of steps 2..5 (agreed by all processes)."""
        per_step = torch.tensor([run.budget.seconds_per_step()], device=self.device)
        per_step = reduce(self.accelerator, per_step, "max")
        steps = run.budget.steps_for_time(float(per_step), done=run.pos.step)
        if self.main:
            self.console.print(f"  {run.name}: {float(per_step):.3f} s/step -> {steps} steps in "
                               f"{run.stage.minutes} min", highlight=False)
        return steps

    def _train_step(self, run: StageRun, teacher: nn.Module | None, rows: list[int],
                    autocast: Callable) -> tuple[Tensor, int, float]:
        acc, stage, data, module = self.accelerator, run.stage, run.train, run.module
        ids_all, mask_all, pos_all = data.input_ids[rows], data.attention_mask[rows], data.position_ids[rows]
        step_tokens = int(mask_all.sum())
        denom = max(run.objective.step_denominator(run.student, ids_all, mask_all, pos_all), 1.0)
        micro = micro_batches(rows, stage.batch_size, stage.grad_accum, self.world, acc.process_index)
        stats = None
        for m, sel in enumerate(micro):
            ids, mask, pos = (x[sel].to(self.device) for x in (data.input_ids, data.attention_mask, data.position_ids))
            extra = run.objective.teacher_pass(teacher, ids, pos, autocast) if teacher is not None else {}
            if data.loss_weight is not None:  # answer tokens weighted up (retrieval answer_weight); training only
                extra["loss_weight"] = data.loss_weight[sel].to(self.device)
            sync = contextlib.nullcontext() if m == len(micro) - 1 else acc.no_sync(module)
            with sync:
                with autocast():
                    loss, st = module(ids, mask, pos, **extra)
                # DDP averages gradients over processes: scale by world so the result is the global-batch mean.
                acc.backward(loss * (self.world / denom))
            stats = st if stats is None else stats + st
        if stage.max_grad_norm is not None:
            acc.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], stage.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return reduce(acc, stats, "sum").float().cpu(), step_tokens, denom

    @torch.no_grad()
    def _evaluate(self, run: StageRun, teacher: nn.Module | None) -> dict[str, Any]:
        """Held-out value of the stage objective (plus CE perplexity for LM stages), summed over processes."""
        stage, held, pos, objective = run.stage, run.held, run.pos, run.objective
        n = min(stage.eval_rows, len(held))
        per_rank = math.ceil(n / self.world)
        rows = [(self.accelerator.process_index * per_rank + i) % len(held) for i in range(per_rank)]
        autocast = self._autocast(stage)
        run.module.eval()
        stats, denom_t, real = None, 0.0, 0
        for b in range(0, len(rows), stage.batch_size):
            sel = rows[b:b + stage.batch_size]
            ids, mask, pids = (x[sel].to(self.device) for x in (held.input_ids, held.attention_mask, held.position_ids))
            extra = objective.teacher_pass(teacher, ids, pids, autocast) if teacher is not None else {}
            with autocast():
                _, st = run.module(ids, mask, pids, **extra)
            stats = st if stats is None else stats + st
            real += int(mask.sum())
            denom_t += objective.denominator(ids, mask, pids)
        payload = torch.cat([stats.float(), torch.tensor([denom_t], device=stats.device)])
        payload = reduce(self.accelerator, payload, "sum")
        if float(payload[-1]) == 0:  # a perplexity of no tokens would read 1.0
            raise NHAError(f"stage {run.name}: the held-out rows hold no token to predict; add data or lower seq_len")
        stats, denom_t = payload[:-1].cpu(), float(payload[-1])
        record = objective.held_out_record(stats, denom_t)
        self.metrics.write(event="eval", stage=run.name, step=pos.step, global_step=pos.global_step, **record,
                           padding_frac=round(1 - real / max(1, len(rows) * stage.seq_len), 4))
        if self.main:
            shown = {k: round(v, 5) for k, v in record.items() if isinstance(v, float)}
            self.console.print(f"  held-out after step {pos.step} of {run.name}: {shown}", highlight=False)
        self.last_eval = record
        return record


def train(recipe: Recipe, **kwargs: Any) -> Path:
    return Trainer(recipe, **kwargs).run()

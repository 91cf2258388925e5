"""The training loop: stages in order, accelerate for one or many GPUs, atomic checkpoints, exact resume, Ctrl-C.

Batches: the rows of global step i are a pure function of (seed, stage, i) (data.step_rows). Each global batch is
split into grad_accum micro-steps x devices; every loss is a token SUM divided by the token count of the whole
global batch, so one GPU and N GPUs at the same global batch compute the same loss and gradient.

Checkpoints (run_dir/checkpoints/step-XXXXXXXX-stageS) hold the full training state through accelerate's
save_state (weights of the model being trained, optimizer, the RNG of every process) plus the scheduler and the
position (stage, step). One is written when a stage starts, every `checkpoint_every` steps, and on Ctrl-C. They are
written into a temporary folder and renamed into place, so the latest complete one is always usable; `--resume`
continues from it and gives the same fp32 weights as a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from torch import Tensor, nn

from ..errors import NHAError
from .checkpoints import (STATE_FILE, Position, check_run_dir, checkpoint_dirs, load_checkpoint,  # noqa: F401
                          newest_intact, read_position, save_checkpoint)
from .data import Corpus, Rows, build_corpus, step_rows
from .losses import attention_mse, lm_objective, next_token_targets
from .probe import stage_end_probe
from .progress import MetricsLog, StageProgress
from .recipe import Recipe, StageSpec, stage_name
from .trainables import causal_lm, count_parameters, is_gate, merge_lora, select_trainables

log = logging.getLogger("nha_convert.finetune")
# Tied embeddings are saved once and re-tied on load (the resume test checks it): no need to warn each time.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved (its path is the message's subject)."""

    def __init__(self, checkpoint: Path | None, global_step: int):
        super().__init__(str(checkpoint))
        self.checkpoint, self.global_step = checkpoint, global_step


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last call (GiB), for the metrics log; nothing on CPU."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 1024**3
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_mem_gib": round(peak, 2)}


# --- hooks on the attention modules ----------------------------------------------------------------


def attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = getattr(causal_lm(model).model, "layers", None)
    if layers is None:
        raise NHAError(f"{type(causal_lm(model)).__name__} has no decoder layers at .model.layers; "
                       "attention transfer supports Llama / Qwen2 / Qwen3 / Mistral models")
    return [layer.self_attn for layer in layers]


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def capture_attention(modules: list[nn.Module]):
    """Record each attention module's input hidden states and output (teacher side)."""
    inputs: list[Tensor | None] = [None] * len(modules)
    outputs: list[Tensor | None] = [None] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def pre(mod, args, kwargs, i=i):
            inputs[i] = _hidden_of(args, kwargs)

        def post(mod, args, kwargs, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def substitute_attention_inputs(modules: list[nn.Module], inputs: list[Tensor]):
    """Run each attention module on the given inputs instead of its own, recording the outputs (student side).

    The student then computes its attention on exactly the teacher's hidden states, layer by layer, inside an
    ordinary forward pass (which keeps DDP / FSDP / gradient checkpointing in charge of the parameters).
    """
    outputs: list[Tensor | None] = [None] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def pre(mod, args, kwargs, i=i):
            x = inputs[i].to(_hidden_of(args, kwargs).dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        def post(mod, args, kwargs, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


# --- the module accelerate wraps -------------------------------------------------------------------


class StageLoss(nn.Module):
    """Student + the stage objective; returns (loss sum, detached statistics).

    The loss is computed inside forward so that DDP / FSDP see one forward per micro-step and the LM head's
    parameters are available (FSDP) while the chunked losses run.
    statistics: attention_transfer -> per-layer MSE sums (L,); distill / finetune -> [KL sum, CE sum, positions].
    """

    def __init__(self, student: nn.Module, stage: StageSpec, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.stage = stage
        self._teacher = [teacher]  # a list: the teacher must not become a submodule (not trained, not sharded)
        # FSDP's auto-wrap policy shards per decoder layer, read from here.
        self._no_split_modules = list(getattr(causal_lm(student), "_no_split_modules", None) or [])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                teacher_inputs: list[Tensor] | None = None, teacher_outputs: list[Tensor] | None = None,
                teacher_hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Packed rows (data.py): the model sees the position ids only (they keep the pieces apart); the
        attention mask marks real tokens for the loss."""
        lm = causal_lm(self.student)
        s = self.stage
        if s.kind == "attention_transfer":
            with substitute_attention_inputs(attention_modules(self.student), teacher_inputs) as outs:
                lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            per_layer = attention_mse(outs, teacher_outputs, attention_mask)
            return per_layer.sum(), per_layer.detach()
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        targets = next_token_targets(input_ids, attention_mask, position_ids)
        want_kl = s.kind == "distill"  # CE is reported for distill too (held-out perplexity)
        loss, kl, ce, n = lm_objective(hidden, targets, lm.get_output_embeddings(), teacher_hidden=teacher_hidden,
                                       teacher_head=self._teacher[0].get_output_embeddings() if want_kl else None,
                                       temperature=s.temperature, ce_weight=s.ce_weight if want_kl else 1.0,
                                       want_kl=want_kl, chunk=s.loss_chunk)
        return loss, torch.stack([kl, ce, kl.new_tensor(float(n))])


@torch.no_grad()
def teacher_pass(teacher: nn.Module, stage: StageSpec, input_ids: Tensor, position_ids: Tensor,
                 autocast: Callable) -> dict[str, Any]:
    """The teacher on the same packed rows: with no attention mask, transformers derives the block-diagonal causal
    mask of its full-attention layers from the position ids (masking_utils.find_packed_sequence_indices)."""
    if stage.kind == "finetune":
        return {}
    with autocast():
        if stage.kind == "attention_transfer":
            with capture_attention(attention_modules(teacher)) as (ins, outs):
                teacher.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            return {"teacher_inputs": ins, "teacher_outputs": outs}
        hidden = teacher.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return {"teacher_hidden": hidden}


# --- schedule, plan --------------------------------------------------------------------------------


def lr_factor(stage: StageSpec, total: list[int]) -> Callable[[int], float]:
    """LR multiplier; `total` is a one-item list, as a time-budgeted stage fixes its step count after timing."""
    def f(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.schedule == "constant":
            return 1.0
        span = max(1, total[0] - stage.warmup_steps)
        progress = min(1.0, (step - stage.warmup_steps) / span)
        shape = 1 - progress if stage.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * shape
    return f


TIMED_STEPS = 5  # a time budget is turned into steps after timing 4 steps (the first one warms up)
PROVISIONAL = 10**9


def stage_steps(stage: StageSpec, world: int) -> int | None:
    """Steps of a stage, or None for a time budget (fixed once steps are timed)."""
    if stage.steps is not None:
        return stage.steps
    if stage.tokens is None:
        return None
    per_step = stage.batch_size * stage.grad_accum * world * stage.seq_len
    return max(1, math.ceil(stage.tokens / per_step))


def _forget_optimizer_state(optimizer: Any) -> None:
    """Empty the state of an optimizer that has not stepped yet.

    Under FSDP, saving the optimizer goes through torch.distributed.checkpoint, which fills an empty optimizer by
    running one step with zero gradients at lr 0. AdamW's step counter then starts at 1 and its bias correction
    makes the first real update 0.74x as large (the FSDP2 loss curve left the 1-GPU one at step 2). The same state
    comes back when resuming from a stage-start checkpoint, so both paths call this before the stage's first step.
    """
    getattr(optimizer, "optimizer", optimizer).state.clear()


# --- the trainer -----------------------------------------------------------------------------------


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
        self._stop = False

    # -- set-up --

    def _check_run_dir(self) -> Path | None:
        ckpt = check_run_dir(self.run_dir, resume=self.resume, overwrite=self.overwrite)
        if self.resume:
            _, damaged = newest_intact(self.run_dir)
            if damaged and self.main:
                self.console.print(f"[yellow]skipping damaged checkpoint(s) "
                                   f"{', '.join(f'{p.name} ({why})' for p, why in damaged)}: resuming from the "
                                   f"previous intact one, {ckpt.name}; delete the damaged folder(s)", highlight=False)
            return ckpt
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            self.accelerator.wait_for_everyone()
            if self.main:
                shutil.rmtree(self.run_dir)
        self.accelerator.wait_for_everyone()
        return None

    def _autocast(self, stage: StageSpec):
        return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=stage.bf16)

    # -- checkpoints --

    def _save(self, pos: Position, scheduler: Any) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, pos, scheduler,
                               {"recipe": self.recipe.source, "budget": self.recipe.budget},
                               self.recipe.output.keep_checkpoints)

    def _load(self, ckpt: Path, scheduler: Any) -> Position:
        return load_checkpoint(self.accelerator, ckpt, scheduler)

    # -- Ctrl-C --

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._stop = True
        signal.signal(signal.SIGINT, self._old_sigint)  # a second Ctrl-C stops at once
        if self.main:
            self.console.print("[yellow]Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)")

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "max")
        return bool(flag.item())

    # -- main --

    def run(self) -> Path:
        recipe, acc = self.recipe, self.accelerator
        ckpt = self._check_run_dir()
        start = read_position(ckpt) if ckpt is not None else None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if start is not None:
                self.metrics.truncate_after(start.global_step)
                self.console.print(f"resuming from {ckpt} (stage {start.stage}, step {start.step})")

        torch.manual_seed(recipe.seed)
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
        if any(s.kind == "teacher" for s in recipe.data.sources) and not self.main:
            acc.wait_for_everyone()
        corpus = build_corpus(recipe.data, tokenizer, seed=recipe.seed, teacher=teacher,
                              cache_dir=self.run_dir / "data", documents=self._documents)
        if any(s.kind == "teacher" for s in recipe.data.sources) and self.main:
            acc.wait_for_everyone()

        self._old_sigint = signal.getsignal(signal.SIGINT)
        in_main_thread = True
        try:
            signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread (some test runners): no Ctrl-C handling
            in_main_thread = False
        try:
            pos = Position(global_step=start.global_step, tokens=start.tokens) if start else Position()
            for idx, stage in enumerate(recipe.stages):
                if start is not None and idx < start.stage:
                    continue
                resume_from = ckpt if start is not None and idx == start.stage else None
                student, pos = self._run_stage(idx, stage, student, teacher, corpus, pos, resume_from)
                stage_end_probe(self, student, tokenizer, stage_name(stage), pos.global_step)  # recipe.probe
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, self._old_sigint)

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

    def _run_stage(self, idx: int, stage: StageSpec, student: nn.Module, teacher: nn.Module | None, corpus: Corpus,
                   pos: Position, resume_from: Path | None) -> tuple[nn.Module, Position]:
        acc, recipe = self.accelerator, self.recipe
        name = stage_name(stage)
        planned = stage_steps(stage, self.world)
        total = [planned if planned is not None else PROVISIONAL]  # shared with the LR schedule
        G = stage.batch_size * stage.grad_accum * self.world
        train, held = corpus.rows(stage.seq_len, "train"), corpus.rows(stage.seq_len, "held_out")
        if stage.kind != "finetune" and teacher is None:
            raise NHAError(f"stage {name} ({stage.kind}) needs a teacher")

        student = select_trainables(student, stage.trains, stage.lora,
                                    fp32_trainables=recipe.model.dtype == "bfloat16")
        _freeze_unused_gates(student)
        if not any(p.requires_grad for p in student.parameters()):
            raise NHAError(f"stage {name}: trains: {stage.trains} leaves nothing to train in this model "
                           "(no NHA gates outside full-attention layers); use trains: lora or attention")
        if stage.gradient_checkpointing:
            causal_lm(student).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable, n_params = count_parameters(student)
        gates = [p for n, p in student.named_parameters() if p.requires_grad and is_gate(n)]
        others = [p for n, p in student.named_parameters() if p.requires_grad and not is_gate(n)]
        groups = [{"params": g, "lr": lr} for g, lr in ((others, stage.lr), (gates, stage.gate_lr or stage.lr)) if g]
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)
        module, optimizer = acc.prepare(StageLoss(student, stage, teacher), optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(stage, total))

        if resume_from is not None:
            pos = self._load(resume_from, scheduler)
            if pos.total is not None:
                total[0] = pos.total
        else:
            pos = Position(stage=idx, step=0, global_step=pos.global_step, tokens=pos.tokens, total=planned)
            if recipe.output.checkpoint_every > 0:
                self._save(pos, scheduler)
        if pos.step == 0:
            _forget_optimizer_state(optimizer)
        amount = f"{stage.minutes} min" if planned is None and pos.total is None else f"{total[0]} steps"
        if self.main:
            self.console.print(f"[bold]stage {idx} {name}[/] ({stage.kind}): trains {stage.trains}, "
                               f"{trainable:,} of {n_params:,} parameters; {amount} x {G} rows x "
                               f"{stage.seq_len} tokens; {len(train)} training rows, {len(held)} held-out rows")
        if resume_from is None:
            self.metrics.write(event="stage_start", stage=name, global_step=pos.global_step, steps=pos.total,
                               minutes=stage.minutes, global_batch=G, seq_len=stage.seq_len, trainable=trainable,
                               devices=self.world, padding_frac=round(train.padding_frac, 4))
            self._evaluate(module, stage, teacher, held, pos, name)

        seed = recipe.seed * 1009 + idx
        autocast = self._autocast(stage)
        t_start = time.perf_counter()
        t_timed, first = None, 0
        logged = [0, 0]  # real tokens, positions since the last log line (its padding_frac)
        module.train()
        with StageProgress(self.console, f"{idx}:{name}", pos.total or 0, pos.step, self.main,
                           recipe.output.log_every) as bar:
            while pos.step < total[0]:
                rows = step_rows(len(train), G, pos.step, seed)
                stats, step_tokens, denom = self._train_step(module, optimizer, stage, teacher, train, rows, autocast)
                scheduler.step()
                pos.step += 1
                pos.global_step += 1
                pos.tokens += step_tokens
                logged[0] += step_tokens
                logged[1] += len(rows) * stage.seq_len
                loss = stage_loss_value(stage, stats, denom)
                if pos.total is None:  # a time budget: time 4 steps after the first, then fix the step count
                    if t_timed is None:
                        t_timed, first = time.perf_counter(), pos.step
                    elif pos.step == first + TIMED_STEPS - 1:
                        pos.total = self._steps_for_time(stage, t_start, t_timed, done=pos.step)
                        total[0] = pos.total
                        bar.set_total(pos.total)
                        self.metrics.write(event="steps_fixed", stage=name, global_step=pos.global_step,
                                           steps=pos.total, minutes=stage.minutes)
                bar.update(pos.step, loss, step_tokens)
                if pos.step % recipe.output.log_every == 0 or pos.step == total[0]:
                    self.metrics.write(stage=name, step=pos.step, global_step=pos.global_step, loss=loss,
                                       lr=scheduler.get_last_lr()[0], tokens=pos.tokens,
                                       tokens_per_s=round(bar.tokens_per_s(), 1),
                                       padding_frac=round(1 - logged[0] / max(1, logged[1]), 4),
                                       time_s=round(time.perf_counter() - t_start, 3), **_peak_memory(self.device))
                    logged = [0, 0]
                if stage.eval_every and pos.step % stage.eval_every == 0 and pos.step < total[0]:
                    self._evaluate(module, stage, teacher, held, pos, name)
                    module.train()
                if self.step_callback is not None:
                    self.step_callback(pos.global_step)
                if self._should_stop():
                    path = self._save(pos, scheduler)
                    raise Interrupted(path, pos.global_step)
                every = recipe.output.checkpoint_every
                if every and pos.step % every == 0 and pos.step < total[0]:
                    self._save(pos, scheduler)
                if stage.max_minutes is not None and (time.perf_counter() - t_start) / 60 > stage.max_minutes:
                    bar.note(f"stage {name}: time limit of {stage.max_minutes} min reached at step {pos.step}")
                    break
        self._evaluate(module, stage, teacher, held, pos, name)

        student = acc.unwrap_model(module).student
        if self._fsdp:
            student = self._unshard(module, student, stage)
        acc.free_memory()
        del module, optimizer, scheduler
        if stage.gradient_checkpointing:
            causal_lm(student).gradient_checkpointing_disable()
        student = merge_lora(student)
        for p in student.parameters():
            p.requires_grad_(False)
        if recipe.model.dtype == "bfloat16":
            for p in student.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        return student, Position(stage=idx + 1, step=0, global_step=pos.global_step, tokens=pos.tokens)

    @property
    def _fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _unshard(self, module: nn.Module, student: nn.Module, stage: StageSpec) -> nn.Module:
        """FSDP shards the student in place; gather its full weights on every process into a fresh, unsharded copy
        (same structure, LoRA included, so merge_lora works as without FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        full = {k.removeprefix("student."): v for k, v in full.items()}
        lm = causal_lm(student)
        fresh = AutoModelForCausalLM.from_config(lm.config, dtype=DTYPE[self.recipe.model.dtype])
        if stage.trains == "lora":
            from .trainables import add_lora

            fresh = add_lora(fresh, stage.lora)
        missing, unexpected = fresh.load_state_dict(full, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise RuntimeError(f"FSDP gather: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if getattr(lm.config, "tie_word_embeddings", False):
            causal_lm(fresh).tie_weights()
        return fresh.to(self.device)

    def _steps_for_time(self, stage: StageSpec, t_start: float, t_timed: float, done: int) -> int:
        """Step count that fills the stage's time budget, from the time of steps 2..5 (agreed by all processes)."""
        per_step = torch.tensor([(time.perf_counter() - t_timed) / (TIMED_STEPS - 1)], device=self.device)
        if self.world > 1:
            per_step = self.accelerator.reduce(per_step, "max")
        left = stage.minutes * 60 - (time.perf_counter() - t_start)
        steps = done + max(0, int(left / float(per_step)))
        if self.main:
            self.console.print(f"  {stage_name(stage)}: {float(per_step):.3f} s/step -> {steps} steps in "
                               f"{stage.minutes} min", highlight=False)
        return steps

    def _micro_batches(self, rows: list[int], stage: StageSpec) -> list[list[int]]:
        """This process's micro-batches of a global batch: micro-step m, rank r takes slice m*world + r."""
        bs, r = stage.batch_size, self.accelerator.process_index
        return [rows[(m * self.world + r) * bs:(m * self.world + r + 1) * bs] for m in range(stage.grad_accum)]

    def _train_step(self, module: nn.Module, optimizer: Any, stage: StageSpec, teacher: nn.Module | None,
                    data: Rows, rows: list[int], autocast: Callable) -> tuple[Tensor, int, float]:
        acc = self.accelerator
        ids_all, mask_all, pos_all = data.input_ids[rows], data.attention_mask[rows], data.position_ids[rows]
        step_tokens = int(mask_all.sum())
        if stage.kind == "attention_transfer":
            denom = float(step_tokens * len(attention_modules(acc.unwrap_model(module).student)))
        else:
            denom = float((next_token_targets(ids_all, mask_all, pos_all) != -100).sum())
        denom = max(denom, 1.0)
        micro = self._micro_batches(rows, stage)
        stats = None
        for m, sel in enumerate(micro):
            ids, mask, pos = (x[sel].to(self.device) for x in (data.input_ids, data.attention_mask, data.position_ids))
            extra = teacher_pass(teacher, stage, ids, pos, autocast) if teacher is not None else {}
            sync = contextlib.nullcontext() if m == len(micro) - 1 else acc.no_sync(module)
            with sync:
                with autocast():
                    loss, st = module(ids, mask, pos, **extra)
                # DDP averages gradients over processes: scale by world so the result is the global-batch mean.
                acc.backward(loss * (self.world / denom))
            stats = st if stats is None else stats + st
        if stage.max_grad_norm is not None:
            acc.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], stage.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            stats = acc.reduce(stats, "sum")
        return stats.float().cpu(), step_tokens, denom

    @torch.no_grad()
    def _evaluate(self, module: nn.Module, stage: StageSpec, teacher: nn.Module | None, held: Rows,
                  pos: Position, name: str) -> dict[str, Any]:
        """Held-out value of the stage objective (plus CE perplexity for LM stages), summed over processes."""
        acc = self.accelerator
        n = min(stage.eval_rows, len(held))
        per_rank = math.ceil(n / self.world)
        rows = [(self.accelerator.process_index * per_rank + i) % len(held) for i in range(per_rank)]
        autocast = self._autocast(stage)
        module.eval()
        stats, denom_t, real = None, 0.0, 0
        for b in range(0, len(rows), stage.batch_size):
            sel = rows[b:b + stage.batch_size]
            ids, mask, pids = (x[sel].to(self.device) for x in (held.input_ids, held.attention_mask, held.position_ids))
            extra = teacher_pass(teacher, stage, ids, pids, autocast) if teacher is not None else {}
            with autocast():
                _, st = module(ids, mask, pids, **extra)
            stats = st if stats is None else stats + st
            real += int(mask.sum())
            denom_t += float(mask.sum()) if stage.kind == "attention_transfer" else \
                float((next_token_targets(ids, mask, pids) != -100).sum())
        payload = torch.cat([stats.float(), torch.tensor([denom_t], device=stats.device)])
        if self.world > 1:
            payload = acc.reduce(payload, "sum")
        stats, denom_t = payload[:-1].cpu(), max(float(payload[-1]), 1.0)
        if stage.kind == "attention_transfer":
            per_layer = (stats / denom_t).tolist()
            record = {"val_loss": sum(per_layer) / len(per_layer), "val_mse_per_layer": per_layer}
        else:
            ce = float(stats[1] / denom_t)
            record = {"val_loss": stage_loss_value(stage, stats, denom_t), "val_ce": ce,
                      "val_ppl": math.exp(min(ce, 50.0))}
            if stage.kind == "distill":
                record["val_kl"] = float(stats[0] / denom_t)
        self.metrics.write(event="eval", stage=name, step=pos.step, global_step=pos.global_step, **record,
                           padding_frac=round(1 - real / max(1, len(rows) * stage.seq_len), 4))
        if self.main:
            shown = {k: round(v, 5) for k, v in record.items() if isinstance(v, float)}
            self.console.print(f"  held-out after step {pos.step} of {name}: {shown}", highlight=False)
        self.last_eval = record
        return record


def stage_loss_value(stage: StageSpec, stats: Tensor, denom: float) -> float:
    """The stage objective per token (per token and layer for attention transfer) from summed statistics."""
    if stage.kind == "attention_transfer":
        return float(stats.sum() / denom)
    if stage.kind == "distill":
        return float(((1 - stage.ce_weight) * stats[0] + stage.ce_weight * stats[1]) / denom)
    return float(stats[1] / denom)


def _freeze_unused_gates(model: nn.Module) -> None:
    """Gates of full-attention layers (window None) never reach the output, and empty ones (0 slots) hold
    nothing: training them would only leave DDP waiting for gradients that never come."""
    for attn in attention_modules(model):
        g = getattr(attn, "g_proj", None)
        if g is None:
            continue
        if getattr(attn, "window", 0) is None or getattr(attn, "num_slots", 1) == 0:
            for p in g.parameters():
                p.requires_grad_(False)


def train(recipe: Recipe, **kwargs: Any) -> Path:
    return Trainer(recipe, **kwargs).run()

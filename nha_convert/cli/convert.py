"""`nha-convert`: replace every attention module of a pretrained model with an NHA layer and save the result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import NHAError
from ..io import check_output_dir, check_weights, save
from ..settings import AUTO, NHASettings, ResolvedNHA
from .common import Steps, VersionOption, console, parse_dtype, run_app

app = typer.Typer(add_completion=False, rich_markup_mode="rich")

CONTEXTS = (4096, 32768, 131072)


def parse_layers(text: str) -> list[int] | str:
    """Comma-separated layer indices, or auto:K (passed on as text; NHASettings validates K)."""
    if text.strip().startswith(AUTO):
        return text.strip()
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise NHAError(f"--full-layers takes comma-separated layer indices like 0,15,31; got {text!r}") from None


@app.command()
def convert_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the converted model to.",
                                         show_default=False)],
    model: Annotated[str | None, typer.Argument(
        help="Hub id (meta-llama/Meta-Llama-3-8B), local HF folder, or alias: llama-3-8b, llama-3.1-8b, "
             "qwen2.5-7b, qwen3-8b, mistral-7b, smollm2-135m. Omit it to convert the embedded SmolLM2-135M.",
        show_default=False)] = None,
    window: Annotated[int, typer.Option(help="Sliding-window size w of the NHA layers, in tokens (0 = slots only).")] = 64,
    slots: Annotated[int, typer.Option(help="Long-term memory slots m per KV head (0 = sliding window only).")] = 64,
    sinks: Annotated[int, typer.Option(help="First tokens that always stay visible (attention sinks).")] = 0,
    full_layers: Annotated[str, typer.Option(help="Layers that keep full attention, e.g. 0,15,31; or auto:K to "
                                                "choose the K best from calibration data.")] = "",
    full_every: Annotated[int | None, typer.Option(help="Keep full attention in layers 0, k, 2k, ...")] = None,
    full_heads: Annotated[str, typer.Option(help="KV heads kept at full attention inside NHA layers (exact heads), "
                                                "as layer:head pairs, e.g. 3:0,5:1; or auto:K to choose the K heads "
                                                "that attend most beyond the window on calibration data.")] = "",
    gate_init: Annotated[str, typer.Option(help="Gate init: pooled-k (from W_k), constant, or multiscale (pooled-k "
                                           "with slot memory horizons from 16 to 16384 tokens).")] = "pooled-k",
    gate_decay: Annotated[float, typer.Option(help="Mean slot decay of the constant gate init.")] = 0.99,
    gate_temperature: Annotated[float, typer.Option(help="tau in log(alpha) = logsigmoid(W_g x) / tau.")] = 8.0,
    slot_bias: Annotated[float | None, typer.Option(
        help="Initial slot-logit bias b_h (trainable); very negative, e.g. -10, starts as sliding-window attention. "
             "Unset: no bias (the paper's layer).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), bfloat16, float16 or float32.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    calibration_len: Annotated[int, typer.Option(
        help="Tokens per calibration sequence of --full-layers / --full-heads auto:K.")] = 2048,
    calibration_seqs: Annotated[int, typer.Option(help="Text sequences and retrieval documents (each) of auto:K.")] = 8,
    version: VersionOption = False,
) -> None:
    """Convert a pretrained Llama / Qwen2 / Qwen3 / Mistral model to Native Hybrid Attention.

    Every attention layer becomes an NHA layer (sliding window + gated memory slots under one softmax) that reuses the pretrained q/k/v/o weights; only the gate projection is new.

    The output is a standard Hugging Face folder: load it with [bold]nha_convert.load(path)[/], or with AutoModelForCausalLM after `import nha_convert`.

    [bold]Examples[/]

    nha-convert -o smollm2-nha   [dim]# the embedded SmolLM2-135M, w=64, m=64[/]

    nha-convert llama-3-8b -o llama3-nha --window 512 --full-every 8 --sinks 4
    """
    from .. import hub  # torch and transformers: imported by the command, so --help and --version start at once
    from ..convert import convert, nha_config_for

    started = time.perf_counter()
    settings = NHASettings(window=window, slots=slots, sinks=sinks, full_layers=parse_layers(full_layers),
                           full_every=full_every, gate_init=gate_init, gate_decay=gate_decay,
                           gate_temperature=gate_temperature, slot_bias=slot_bias, full_heads=full_heads)
    torch_dtype = parse_dtype(dtype)
    check_output_dir(output, overwrite)  # exists, is a file, or cannot be written: said before any loading
    base_config = hub.load_config(model)
    nha_config_for(base_config, settings)  # validates settings against the model before loading weights
    source = hub.resolve_source(model)
    if isinstance(source, Path):
        check_weights(source)  # a truncated or missing weight file: one line, not a loader traceback
    with Steps() as steps:
        steps.start("loading base model")
        base, tokenizer = hub.load_base_model(model, dtype=torch_dtype)
        check_finite(base, model or "smollm2-135m")
        base_params = sum(p.numel() for p in base.parameters())
        steps.start("converting attention layers")
        nha = convert(base, settings, tokenizer=tokenizer, seq_len=calibration_len, text_seqs=calibration_seqs,
                      retrieval_docs=calibration_seqs)
        steps.start(f"saving to {output}")
        save(nha, tokenizer, output, overwrite=overwrite)
    elapsed = time.perf_counter() - started
    console.print(summary(nha, base_params, model or "smollm2-135m (embedded)", output, elapsed))


def check_finite(model, name: str) -> None:
    """A base model with NaN or inf weights (damaged bytes of the right size pass the file checks) converts into a
    model that outputs NaN: refuse it, naming the first such tensor."""
    import torch

    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NHAError(f"model {name}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); its weights are "
                       "damaged: re-save or re-download the model")


def _layer_groups(windows: list[int | None]) -> str:
    groups, start = [], 0
    for i in range(1, len(windows) + 1):
        if i == len(windows) or windows[i] != windows[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            groups.append(f"{span}: {'full' if windows[start] is None else f'w={windows[start]}'}")
            start = i
    return ", ".join(groups)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _ratio(state: int, kv: int) -> str:
    """"4.0x smaller" / "1.2x larger" / "same size": an all-full conversion keeps the KV cache plus the gates."""
    if state < kv / 1.005:
        return f"{kv / state:,.1f}x smaller"
    if state > kv * 1.005:
        return f"{state / kv:,.2f}x larger"
    return "same size"


def _auto_choice(nha: dict) -> str:
    """The auto:K choice and the best per-layer scores (fraction of the all-NHA gap opened by converting that layer alone)."""
    scores = nha["full_layer_scores"]
    ranked = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])
    best = ", ".join(f"{i}: {scores[i]:.3f}" for i in ranked[: max(5, nha["full_layers_auto"])])
    return (f"layers {', '.join(map(str, nha['full_layers']))}; best scores {best} "
            f"({nha['full_layer_selection']['seconds']} s)")


def _full_heads(nha: dict, s: ResolvedNHA) -> str:
    """The exact heads (layer:head) and, for auto:K, the best head scores (attention mass beyond the window)."""
    text = ", ".join(f"{i}:{h}" for i, hs in sorted(s.full_heads.items()) for h in hs)
    scores = nha.get("full_head_scores")
    if scores:
        ranked = sorted(((int(i), h, v) for i, vs in scores.items() for h, v in enumerate(vs)), key=lambda x: -x[2])
        best = ", ".join(f"{i}:{h}: {v:.3f}" for i, h, v in ranked[: max(5, nha["full_heads_auto"])])
        text += f"; best scores {best} ({nha['full_head_selection']['seconds']} s)"
    return text


def summary(model, base_params: int, name: str, output: Path, elapsed: float) -> Table:
    from ..memory import kv_cache_bytes, nha_state_bytes

    cfg, nha = model.config, model.config.nha
    s = ResolvedNHA.from_config(cfg)  # the settings, typed; `nha` still holds the auto:K record (scores, timing)
    new = sum(layer.self_attn.g_proj.weight.numel() + layer.self_attn.g_proj.bias.numel()
              for layer in model.model.layers)
    table = Table(title=f"NHA conversion of {name} -> {output} ({elapsed:.1f} s)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layers", _layer_groups(list(s.windows)))
    table.add_row("slots / sinks", f"m={s.slots} per KV head, {s.sinks} sinks")
    table.add_row("gates", f"{s.gate_init} init, tau={s.gate_temperature}"
                  + ("" if s.slot_bias is None else f", slot bias {s.slot_bias:g}"))
    if nha.get("full_layer_scores"):
        table.add_row(f"full layers auto:{nha['full_layers_auto']}", _auto_choice(nha))
    if s.full_heads:
        auto = f" auto:{nha['full_heads_auto']}" if nha.get("full_head_scores") else ""
        table.add_row(f"full heads{auto}", _full_heads(nha, s))
    table.add_row("new parameters", f"{new:,} ({100 * new / base_params:.2f}% of {base_params:,})")
    for ctx in CONTEXTS:
        kv, st = kv_cache_bytes(cfg, ctx), nha_state_bytes(cfg, ctx)
        table.add_row(f"decode state @ {ctx // 1024}K tokens", f"{_mib(st)} vs base KV cache {_mib(kv)} "
                                                               f"({_ratio(st, kv)}, bf16, per sequence)")
    return table


main = run_app(app, "nha-convert")

if __name__ == "__main__":
    main()

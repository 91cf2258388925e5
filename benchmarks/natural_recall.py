"""Natural recall of trained NHA models in one table: probe x length; each model, its score with the slots masked and
what the slots carry; the base model, its sliding-window + 4 sinks baseline; chance.

    python benchmarks/natural_recall.py out/run/model --base smollm2-135m                  # 100 items a cell
    python benchmarks/natural_recall.py out/a/model out/b/model --items 20 --lengths 1024,4096 --ppl

The same run as `nha-eval MODELS --compare BASE --baseline swa-sinks --tasks none --recall --ablate slots`, minus
lm-eval and the PNG charts (neither is on the lent GPU machines): results.json and report.md go to --out, the
summary table to stdout, a line per step with its time to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nha_convert.errors import NHAError  # noqa: E402
from nha_convert.eval.markdown import perplexity_markdown, recall_summary_markdown  # noqa: E402
from nha_convert.eval.report import write_report  # noqa: E402
from nha_convert.eval.run import EvalRequest, PerplexityRequest, Progress, RecallRequest, run_eval  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="NHA model folders (nha-finetune's RUN/model)")
    ap.add_argument("--base", default="smollm2-135m", help="the base model (and the swa-sinks baseline's source); "
                                                           "'none' scores the models alone (runs split over processes)")
    ap.add_argument("--items", type=int, default=None, help="items per probe and length (default: 100 natural, "
                                                            "20 passkey / MQAR)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--probes", default="all", help="as nha-eval --recall-probes")
    ap.add_argument("--ppl", action="store_true", help="perplexity by position too (8 held-out sequences)")
    ap.add_argument("--ppl-len", type=int, default=4096, help="tokens per perplexity sequence (4096: positions 2K-4K)")
    ap.add_argument("--no-baseline", action="store_true", help="leave out the sliding-window + 4 sinks baseline")
    ap.add_argument("--out", default="out/natural-recall")
    args = ap.parse_args(argv)
    from nha_convert.eval.probes import parse

    t0 = time.perf_counter()
    try:
        request = EvalRequest(
            models=args.models, compare=[] if args.base == "none" else [args.base], tasks="none",
            baseline=None if args.no_baseline or args.base == "none" else "swa-sinks", ablate=["slots"],
            recall=RecallRequest(lengths=[int(x) for x in args.lengths.split(",") if x], n=args.items,
                                 probes=parse(args.probes)),
            ppl=PerplexityRequest(seq_len=args.ppl_len) if args.ppl else None,
            command="python benchmarks/natural_recall.py " + " ".join(sys.argv[1:] if argv is None else argv))
        def log(text: str) -> None:
            plain = re.sub(r"\[/?[a-z ]*\]", "", text)  # the CLI's rich markup
            print(f"[{time.perf_counter() - t0:7.1f} s] {plain}", file=sys.stderr)

        results = run_eval(request, Progress(log=log))
    except NHAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_report(results, args.out, charts=False)
    data = results.to_dict()
    print(f"# Natural recall ({data.get('device')}, {data.get('dtype')})\n")
    print(recall_summary_markdown(data) or "(no recall results)")
    ppl = perplexity_markdown(data)
    if ppl:
        print("\n" + ppl)
    print("\nseconds per model (its probes, and again with the slots masked): "
          + ", ".join(f"{k} {v:.0f}" for k, v in data["seconds"].items()))
    print(f"wrote {args.out}/results.json and report.md in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

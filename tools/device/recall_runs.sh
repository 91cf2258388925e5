#!/usr/bin/env bash
# Issue 27's training experiments on one lent GPU (docs/results.md, session 15). Source it after tools/device/setup.sh,
# in the repository root:
#   recall_launch NAME RECIPE [ARGS...]   one run in the background, outliving the call: /root/runs/NAME, NAME.log
#   recall_status                         each run's last progress line
#   recall_eval NAME...                   each finished run's natural-recall table in its own background process
#                                         (benchmarks/natural_recall.py; the first also scores the base and swa-sinks):
#                                         /root/nr/NAME/ (results.json, report.md) and /root/nr/NAME.log
# Runs compared with each other take the same fixed step counts (RECALL_STEPS): concurrent runs share the GPU, so a
# time budget would give them different amounts of training.
RECALL_STEPS=(--set stages.transfer.steps=80 --set stages.distill.steps=450 --set stages.long.steps=160)
RECALL_EVAL=(--items 60 --lengths 1024,2048,4096,8192 --ppl --ppl-len 4096)

recall_launch() {
  local name=$1 recipe=$2
  shift 2
  mkdir -p /root/runs
  setsid nohup python3 -m nha_convert.cli.finetune "$recipe" -b gpu -o "/root/runs/$name" --overwrite \
    "${RECALL_STEPS[@]}" "$@" > "/root/runs/$name.log" 2>&1 < /dev/null &
}

recall_status() {
  local f
  for f in /root/runs/*.log; do
    printf '%s: %s\n' "$(basename "$f" .log)" "$(tr '\r' '\n' < "$f" | grep -v '^[[:space:]]*$' | tail -n 1)"
  done
}

recall_eval() {
  local name base=smollm2-135m
  mkdir -p /root/nr
  for name in "$@"; do
    setsid nohup python3 benchmarks/natural_recall.py "/root/runs/$name/model" --base "$base" "${RECALL_EVAL[@]}" \
      --out "/root/nr/$name" > "/root/nr/$name.log" 2>&1 < /dev/null &
    base=none
  done
}

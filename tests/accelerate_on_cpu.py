"""Launcher for tests/finetune/test_finetune_distributed.py: `nha-finetune` under torchrun on CPU, with accelerate's FSDP2 path.

Run by torchrun with ACCELERATE_USE_CPU=true, accelerate makes a gloo process group and trains with DDP (MULTI_CPU).
It refuses FSDP on CPU, while torch's `fully_shard` itself runs on gloo; with NHA_TEST_FSDP=1 this file turns the
accelerator's FSDP2 path on after it is built (the same plugin settings as recipes/accelerate-fsdp.yaml), so the
trainer's FSDP code (sharded prepare, torch.distributed.checkpoint saves, the stage-end gather) is tested without GPUs.
"""

from __future__ import annotations

import os
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_accelerator_init = accelerate.Accelerator.__init__


def _fsdp_on_cpu_init(self, *args, **kwargs) -> None:
    _accelerator_init(self, *args, **kwargs)
    if self.state.num_processes > 1:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # prepare() reads it from here


if __name__ == "__main__":
    if os.environ.get("NHA_TEST_FSDP") == "1":
        accelerate.Accelerator.__init__ = _fsdp_on_cpu_init
    from nha_convert.cli.finetune import app

    app(args=sys.argv[1:], prog_name="nha-finetune")

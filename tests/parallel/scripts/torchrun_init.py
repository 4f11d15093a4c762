"""Launched by torchrun in test_torchrun.py: join the agent's store, build megatron-core groups, all-reduce."""
import sys

import torch
import torch.distributed as dist

if __name__ == "__main__":
    from megatron.core import parallel_state as ps

    from nemo_neva.parallel.init import initialize_model_parallel_from_cfg

    tp = int(sys.argv[1])
    initialize_model_parallel_from_cfg(tp=tp, pp=1, num_attention_heads=4, num_layers=2)
    x = torch.ones(1)
    dist.all_reduce(x)
    print(f"RESULT rank={dist.get_rank()} world={dist.get_world_size()} backend={dist.get_backend()} "
          f"tp={ps.get_tensor_model_parallel_world_size()} dp={ps.get_data_parallel_world_size()} sum={int(x.item())}",
          flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()

"""The PyTorch FSDP peer of benches/shard_memory.rs: the same training micro-steps under
`torch.distributed.fsdp.FullyShardedDataParallel` with the reference's settings.

DanceGRPO's `fastvideo/utils/fsdp_util.py` (SHARDING.md): FULL_SHARD, one FSDP unit per
`FluxTransformerBlock` / `FluxSingleTransformerBlock` and the rest as the root,
`MixedPrecision(param_dtype=fp32, reduce_dtype=fp32, buffer_dtype=fp32)`, and activation
checkpointing of every block (`checkpoint_wrapper`, non-reentrant). On the CPU there is no bf16
autocast (ours computes in f32 on the CPU too). AdamW with the reference's hyperparameters,
`model.clip_grad_norm_(1.0)`, `zero_grad(set_to_none=True)`.

Run by the Rust bench (one process per rank, env RANK / WORLD_SIZE / MASTER_PORT) with the
project venv's torch 2.11.0 and diffusers 0.42.1, and driven as a rank of ours is: each stdin
line is one micro-step, whose seconds rank 0 prints; at the end of stdin every rank prints
rank, parameters, VmHWM after the imports and the group, after set-up, and at the end (MiB),
and the optimizer steps taken.
"""

import functools
import os
import sys
import time

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    baseline = vm_hwm_mib()
    torch.manual_seed(7)
    # The Rust bench's config(): hidden 512 (8 x 64), 2 + 8 blocks, text width 32.
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    params = sum(p.numel() for p in model.parameters())
    blocks = {FluxTransformerBlock, FluxSingleTransformerBlock}
    fp32 = MixedPrecision(
        param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    model = FSDP(
        model,
        auto_wrap_policy=ModuleWrapPolicy(blocks),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=fp32,
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: isinstance(m, tuple(blocks)),
    )
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4
    )
    loaded = vm_hwm_mib()
    hidden = torch.randn(1, 64, 64)
    text = torch.randn(1, 16, 32)
    pooled = torch.randn(1, 32)
    t = torch.tensor([0.5])
    g = torch.tensor([3.5])
    # Row-major (0, r, c) ids of the 8 x 8 packed grid of a 128 x 128 image.
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).float()
    txt_ids = torch.zeros(16, 3)
    steps = 0
    for _ in sys.stdin:
        start = time.perf_counter()
        out = model(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=t,
            guidance=g,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        out.square().mean().backward()
        model.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if rank == 0:
            print(time.perf_counter() - start, flush=True)
    print(f"{rank} {params} {baseline:.1f} {loaded:.1f} {vm_hwm_mib():.1f} {steps}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

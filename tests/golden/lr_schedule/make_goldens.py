#!/usr/bin/env python3
"""Goldens for the learning-rate schedule (proto/tests/lr_schedule.rs,
worker/tests/train_lr_schedule.rs).

Regenerate (from the repository root):

    $(deploy/reference-venv.sh) tests/golden/lr_schedule/make_goldens.py

Pinned reference: torch 2.11.0 (CPU), diffusers 0.42.1. Deterministic.

lr_schedule.json: for each case, the learning rate every optimizer step of a real
`torch.optim.AdamW` runs with under `diffusers.optimization.get_scheduler(name, ...,
num_warmup_steps, num_training_steps, num_cycles=1, power=1.0)` (DanceGRPO's call), read from
`param_groups[0]["lr"]` before each `optimizer.step()`, then `lr_scheduler.step()` after it, as
train_grpo_flux.py does. Steps run past `num_training_steps` to cover the end of the curves.
- cases[i]: scheduler, warmup, total, base_lr, lr (floats), lr_bits (their IEEE-754 bits, so
  the comparison is exact)

adamw_schedule.safetensors: one f32 parameter trained by torch's AdamW (foreach=False) under
get_scheduler("cosine", warmup 2, total 8) for 8 steps with seeded gradients.
- cfg       [lr, beta1, beta2, eps, weight_decay, warmup, total] (f64)
- init      initial value
- grad.<s>  gradient of step s (1-based)
- param.<s> the parameter after step s
"""

import json
import os
import struct

import diffusers
import safetensors.torch as st
import torch
from diffusers.optimization import get_scheduler

assert torch.__version__.startswith("2.11.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
torch.set_num_threads(1)
OUT = os.path.dirname(os.path.abspath(__file__))


def bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def lrs(name, warmup, total, base_lr, steps):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=base_lr, foreach=False)
    sched = get_scheduler(
        name,
        optimizer=opt,
        num_warmup_steps=warmup,
        num_training_steps=total,
        num_cycles=1,
        power=1.0,
        last_epoch=-1,
    )
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    return out


def schedules():
    cases = []
    for name in ["constant", "constant_with_warmup", "cosine", "linear"]:
        warmups = [0] if name == "constant" else [0, 1, 3, 7]
        for warmup in warmups:
            for total in [10, 13]:
                for base_lr in [1e-5, 3e-4]:
                    lr = lrs(name, warmup, total, base_lr, total + 4)
                    cases.append(
                        {
                            "scheduler": name,
                            "warmup": warmup,
                            "total": total,
                            "base_lr": base_lr,
                            "lr": lr,
                            "lr_bits": [bits(x) for x in lr],
                        }
                    )
    # The reference's own call: num_training_steps 1e6, the launch's warmup 0 and the
    # argparse default 10, over the first steps.
    for name in ["constant_with_warmup", "cosine", "linear"]:
        for warmup in [0, 10]:
            lr = lrs(name, warmup, 1_000_000, 1e-5, 30)
            cases.append(
                {
                    "scheduler": name,
                    "warmup": warmup,
                    "total": 1_000_000,
                    "base_lr": 1e-5,
                    "lr": lr,
                    "lr_bits": [bits(x) for x in lr],
                }
            )
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    with open(os.path.join(OUT, "lr_schedule.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, indent=1)
        f.write("\n")


def adamw():
    lr, b1, b2, eps, wd, warmup, total = 1e-2, 0.9, 0.999, 1e-8, 0.1, 2, 8
    gen = torch.Generator().manual_seed(20261203)
    p = torch.nn.Parameter(torch.randn(6, generator=gen))
    out = {
        "cfg": torch.tensor([lr, b1, b2, eps, wd, warmup, total], dtype=torch.float64),
        "init": p.detach().clone(),
    }
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=total)
    for s in range(1, total + 1):
        g = torch.randn(6, generator=gen)
        p.grad = g.clone()
        out[f"grad.{s}"] = g
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out[f"param.{s}"] = p.detach().clone()
    st.save_file(out, os.path.join(OUT, "adamw_schedule.safetensors"))


if __name__ == "__main__":
    schedules()
    adamw()

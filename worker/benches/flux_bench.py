#!/usr/bin/env python3
"""Python peer of `worker/benches/flux_bench.rs`: diffusers' FluxTransformer2DModel on the same
config, inputs and thread count. The Rust bench runs this script first (same run), loads the
weights and inputs it saves, times its own code and prints the ratios.

Standalone use: `printf 'rollout\ntrain\nckpt\n' | python flux_bench.py --dir DIR --threads N`.
It saves the three configs, prints one JSON line with its settings, then times one step of the
small config per line read from stdin (`rollout`, `train` or `ckpt`: the training micro-step
with gradient checkpointing) and prints its seconds as one JSON line. One step per request lets
the Rust side alternate its steps with these, so that both see the same machine load.
`--mem DIR/NAME --mode plain|ckpt` measures, in a process of its own, the peak memory of one
training micro-step on a saved config (see `rss_peak_delta`).
"""

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time

import safetensors.torch as st
import torch
from diffusers import FluxTransformer2DModel

SMALL = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
             joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(8, 28, 28), in_channels=64)
MID = dict(SMALL, num_attention_heads=8)
# Deeper: what activation checkpointing changes grows with depth (FLUX-dev has 19 + 38 blocks).
DEEP = dict(MID, num_single_layers=12)
TXT = 512


def img_ids(px):
    h = px // 16
    ids = torch.zeros(h, h, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(h)[None, :]
    return ids.reshape(h * h, 3)


def inputs(cfg, px, gen):
    n = (px // 16) ** 2
    return dict(
        hidden_states=torch.randn(1, n, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, TXT, cfg["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.75]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids(px),
        txt_ids=torch.zeros(TXT, 3),
    )


# The SDE step of ALGORITHM.md section 2.4 (sigma 0.75 -> 0.7, eta 0.3).
SIG, SIG_NEXT, ETA = 0.75, 0.7, 0.3


def sde_mean(v, x):
    d = SIG_NEXT - SIG
    x0 = x - SIG * v
    score = -(x - x0 * (1 - SIG)) / SIG**2
    return x + d * v + (-0.5 * ETA**2 * score) * d


def log_prob(v, x, nxt):
    std = ETA * math.sqrt(SIG - SIG_NEXT)
    return (-((nxt - sde_mean(v, x)) ** 2) / (2 * std**2)).mean(dim=(1, 2))


def build(cfg, gen):
    m = FluxTransformer2DModel(**cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    return m


def rollout_step(m, inp):
    with torch.no_grad():
        v = m(**inp, return_dict=False)[0]
        return sde_mean(v, inp["hidden_states"]) + torch.randn_like(v) * ETA * math.sqrt(SIG - SIG_NEXT)


def train_step(m, inp, nxt, keep_grads=False):
    # Timing: gradients set to None, as DanceGRPO's optimizer.zero_grad() does. Memory: zeroed
    # in place, like the Rust side, so the figure is what the step needs beyond them.
    m.zero_grad(set_to_none=not keep_grads)
    v = m(**inp, return_dict=False)[0]
    lp = log_prob(v, inp["hidden_states"], nxt)
    loss = -(0.5 * torch.exp(lp - lp.detach())).mean()
    loss.backward()
    return loss


def seconds(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def rss_peak_delta(f):
    """Peak resident memory growth of f() in MiB: free heap pages are handed back to the OS
    first (malloc_trim), so what f() allocates shows up as growth instead of reusing pages that
    loading freed; then VmHWM is reset through /proc/self/clear_refs."""
    def field(name):
        with open("/proc/self/status") as s:
            for line in s:
                if line.startswith(name):
                    return int(line.split()[1]) / 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as c:
        c.write("5")
    base = field("VmRSS:")
    f()
    return field("VmHWM:") - base


def measure_memory(d, mode):
    """Training micro-steps on the model saved in d, in this fresh process: one to warm up (the
    first also allocates the gradients and one-time buffers), then the median of three."""
    m = FluxTransformer2DModel.from_pretrained(d)
    inp = st.load_file(os.path.join(d, "inputs.safetensors"))
    nxt, _ = inp.pop("next"), inp.pop("v")
    if mode == "ckpt":
        m.enable_gradient_checkpointing()
    train_step(m, inp, nxt, True)
    mib = statistics.median(rss_peak_delta(lambda: train_step(m, inp, nxt, True)) for _ in range(3))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in m.parameters()) / 2**20
    print(json.dumps({"peak_mib": mib, "grads_mib": grads}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--mem", help="a saved config directory: measure memory only")
    ap.add_argument("--mode", choices=("plain", "ckpt"), default="plain")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--mid-px", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.mem:
        measure_memory(a.mem, a.mode)
        return
    gen = torch.Generator().manual_seed(0)
    small = None
    for name, cfg, px in (("small", SMALL, a.px), ("mid", MID, a.mid_px), ("deep", DEEP, a.mid_px)):
        m = build(cfg, gen)
        d = os.path.join(a.dir, name)
        m.save_pretrained(d, safe_serialization=True)
        inp = inputs(cfg, px, gen)
        nxt = rollout_step(m, inp)
        st.save_file({**inp, "next": nxt, "v": m(**inp, return_dict=False)[0].detach()}, os.path.join(d, "inputs.safetensors"))
        if name == "small":
            small = (m, inp, nxt)
        del m
    m, inp, nxt = small
    # Warm-up, as the Rust side does: one of each.
    rollout_step(m, inp)
    train_step(m, inp, nxt)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what == "rollout":
            s = seconds(lambda: rollout_step(m, inp))
        elif what in ("train", "ckpt"):
            if what == "ckpt":
                m.enable_gradient_checkpointing()
            s = seconds(lambda: train_step(m, inp, nxt))
            m.disable_gradient_checkpointing()
        else:
            continue
        print(json.dumps({"seconds": s}), flush=True)


if __name__ == "__main__":
    main()

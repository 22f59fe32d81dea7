#!/usr/bin/env python3
"""Python peer of `worker/benches/train_iteration.rs`: one GRPO iteration of DanceGRPO
(docs/ALGORITHM.md section 12, as re-implemented in tests/golden/train_loop/make_golden.py) on
diffusers' FluxTransformer2DModel, CPU, f32. The Rust bench runs this script first (same run),
loads the weights and inputs it saves, times its own iteration and prints the ratios.

One iteration = rollout of G trajectories one at a time (S no-grad forwards + SDE steps each;
the VAE decode and the reward are left out on both sides) + the update: per trajectory T of its
transitions re-evaluated with grad, PPO-clip loss, backward per transition, and every GA
trajectories clip_grad_norm_ + AdamW.step + zero_grad.

Protocol (standalone: `printf 'tiny\nsmall\n' | python train_iteration_peer.py --dir D --threads N`):
after writing both configs under DIR/<name>/ it prints one JSON line with the settings, then
for every config name read from stdin it runs one iteration of that config (the weights keep
training from one to the next) and prints one JSON line with its seconds (iteration, rollout,
update) and its grad norms and loss (the Rust side compares the first, to show that both sides
time the same computation).
"""

import argparse
import json
import math
import os
import sys
import time

import safetensors.torch as st
import torch
from diffusers import FluxTransformer2DModel

TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6), in_channels=64)
SMALL = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
             joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(8, 28, 28), in_channels=64)
# name -> (model, px, text tokens)
CONFIGS = {"tiny": (TINY, 64, 8), "small": (SMALL, 256, 64)}
S, SHIFT, ETA, G, GA, FRAC = 8, 3.0, 0.3, 4, 2, 0.6
T = int((S - 1) * FRAC)
LR, CLIP_RANGE, ADV_CLIP_MAX, MAX_GRAD_NORM, GUIDANCE = 1e-5, 1e-4, 5.0, 1.0, 3.5
REWARDS = [0.31, 0.27, 0.36, 0.22]


def img_ids(px):
    h = px // 16
    ids = torch.zeros(h, h, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(h)[None, :]
    return ids.reshape(h * h, 3)


def flux_step(v, x, sigmas, i, prev_sample=None, noise=None):
    sigma = sigmas[i]
    dsigma = sigmas[i + 1] - sigma
    mean = x + dsigma * v
    x0 = x - sigma * v
    std = ETA * math.sqrt(sigma - sigmas[i + 1])
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * ETA**2 * score) * dsigma
    if prev_sample is None:
        prev_sample = mean + noise * std
    logp = (-((prev_sample.detach() - mean) ** 2) / (2 * std**2)).mean(dim=tuple(range(1, x.ndim)))
    return prev_sample, logp


class Case:
    def __init__(self, cfg, px, txt, gen):
        self.model = FluxTransformer2DModel(**cfg)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                scale = 0.1 if p.ndim == 1 else 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
        n = (px // 16) ** 2
        t = torch.linspace(1, 0, S + 1)
        self.sigmas = (SHIFT * t) / (1 + (SHIFT - 1) * t)
        self.t_int = torch.tensor([int(s * 1000) for s in self.sigmas][:S], dtype=torch.int64)
        self.inputs = dict(
            encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=gen),
            pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=gen),
            img_ids=img_ids(px),
            txt_ids=torch.zeros(txt, 3),
            init_noise=torch.randn(1, n, 64, generator=gen).to(torch.bfloat16).float(),
            step_noise=torch.randn(G, S, 1, n, 64, generator=gen),
            steps=torch.stack([torch.randperm(S - 1, generator=gen)[:T] for _ in range(G)]),
            rewards=torch.tensor(REWARDS, dtype=torch.float64),
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=1e-4)

    def save(self, d):
        self.model.save_pretrained(d, safe_serialization=True)
        st.save_file({k: v.contiguous() for k, v in self.inputs.items()}, os.path.join(d, "inputs.safetensors"))

    def velocity(self, z, i):
        x = self.inputs
        return self.model(hidden_states=z, encoder_hidden_states=x["encoder_hidden_states"],
                          pooled_projections=x["pooled_projections"], timestep=(self.t_int[i] / 1000).reshape(1),
                          guidance=torch.full((1,), GUIDANCE), img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                          return_dict=False)[0]

    def rollout(self):
        self.model.eval()
        out = []
        with torch.no_grad():
            for g in range(G):
                z = self.inputs["init_noise"]
                lats, lps = [z], []
                for i in range(S):
                    z, lp = flux_step(self.velocity(z, i), z.float(), self.sigmas, i,
                                      noise=self.inputs["step_noise"][g, i])
                    lats.append(z)
                    lps.append(lp)
                out.append((torch.cat(lats), torch.cat(lps)))
        return out

    def update(self, trajectories):
        self.model.train()
        r = self.inputs["rewards"]
        adv = ((r - r.mean()) / (r.std() + 1e-8)).float()
        self.opt.zero_grad()
        norms, total = [], 0.0
        for g, (lats, lps) in enumerate(trajectories):
            for k in self.inputs["steps"][g].tolist():
                _, logp = flux_step(self.velocity(lats[k][None], k), lats[k][None].float(), self.sigmas, k,
                                    prev_sample=lats[k + 1][None].float())
                a = torch.clamp(adv[g:g + 1], -ADV_CLIP_MAX, ADV_CLIP_MAX)
                ratio = torch.exp(logp - lps[k:k + 1])
                loss = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)))
                loss = loss / (GA * T)
                loss.backward()
                total += loss.item()
            if (g + 1) % GA == 0:
                norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)))
                self.opt.step()
                self.opt.zero_grad()
        return norms, total


def iteration(c):
    t0 = time.perf_counter()
    traj = c.rollout()
    t1 = time.perf_counter()
    norms, loss = c.update(traj)
    t2 = time.perf_counter()
    return {"iteration_s": t2 - t0, "rollout_s": t1 - t0, "update_s": t2 - t1, "grad_norms": norms, "loss": loss}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--threads", type=int, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for name, (cfg, px, txt) in CONFIGS.items():
        c = Case(cfg, px, txt, gen)
        c.save(os.path.join(a.dir, name))
        # Warm-up without touching the weights: one forward and backward.
        c.velocity(c.inputs["init_noise"], 0).sum().backward()
        c.model.zero_grad(set_to_none=True)
        cases[name] = c
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "params": dict(S=S, shift=SHIFT, eta=ETA, G=G, GA=GA, lr=LR, clip_range=CLIP_RANGE,
                                     adv_clip_max=ADV_CLIP_MAX, max_grad_norm=MAX_GRAD_NORM,
                                     guidance=GUIDANCE)}), flush=True)
    # One iteration per request, so that the Rust side can interleave its own with ours and
    # both see the same machine load.
    for line in sys.stdin:
        name = line.strip()
        if name:
            print(json.dumps(iteration(cases[name])), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Golden file for one whole GRPO iteration (worker/tests/train_loop_parity.rs).

Regenerate (from the repository root; the first command installs the pinned packages into the
project venv and prints its python):

    $(deploy/reference-venv.sh) tests/golden/train_loop/make_golden.py

Pinned reference: torch 2.11.0 (CPU), diffusers 0.42.1, safetensors 0.8.0. Deterministic (fixed
seeds, CPU, f32, one thread); asserts these versions, so a rerun reproduces the committed files.

The loop is written here from docs/ALGORITHM.md sections 2, 4, 5 and 12 (the DanceGRPO reference's
`train_one_step` with `--init_same_noise --use_group`), in f32 and without autocast:
- rollout: one trajectory at a time (batch 1), no grad, `flux_step` with the mean-element
  Gaussian log-prob (the dead `-log s - log sqrt(2 pi)` line left out, as at the reference
  commit); all G members start from the same bf16 initial noise;
- advantages: `(r - mean) / (std_unbiased + 1e-8)` over the group, clamped to +-5 in the loss;
- update: per trajectory a seeded `randperm(S - 1)[:int((S - 1) * frac)]` of its transitions (the
  last one is never trained), for each `logp_new` of the stored `z_{k+1}` given the stored `z_k`
  with grad, `L = mean(max(-A r, -A clip(r, 1-eps, 1+eps))) / (GA * train_timesteps)`,
  `L.backward()` at once; after trajectory i, when `(i + 1) % GA == 0`,
  `clip_grad_norm_(max_grad_norm)`, `AdamW.step()`, `zero_grad()`.

Tiny model: FluxTransformer2DModel with 1 double + 1 single block, 2 heads x 8 (hidden 16), rope
axes (2, 2, 4), text width 32, pooled 32, guidance embeds; 32x32 px (4 image tokens) and 8 text
tokens. It is this small so that the initial weights plus the weights after two cases stay under
400 KB in git (26,528 parameters; the x0 of the rollout is not stored for the same reason).

What it writes, next to itself:
- transformer/             diffusers layout (config.json + safetensors), the initial weights in
                           bf16 (as the real checkpoint); both sides train f32 masters of them
- train_loop.safetensors
    params                 f64 [S, shift, eta, G, GA, frac, lr, beta1, beta2, eps, wd,
                           adv_clip_max, guidance]
    sigmas, timesteps      the schedule
    encoder_hidden_states [1, 8, 32], pooled_projections [1, 32], img_ids [4, 3], txt_ids [8, 3]
    init_noise             [1, 4, 64] (bf16 values), shared by the group
    step_noise             [G, S, 1, 4, 64], N(0, 1) of each transition of each trajectory
    latents [G, S+1, 4, 64], log_probs [G, S]
    rewards [G] (fixed values: the reward models are tested elsewhere), advantages [G] (f32,
                           unclamped, as the reference computes them)
    steps                  [G, T] i64, each trajectory's trained transitions, in training order
    <case>.hyper           f64 [clip_range, max_grad_norm]
    <case>.losses          [G, T] each transition's loss (already divided by GA * T)
    <case>.ratios          [G, T] each transition's importance ratio
    <case>.grad_norms      [G / GA] clip_grad_norm_'s return value (pre-clip global norm)
    <case>.weight.<name>   every parameter after the iteration (diffusers names)
  for two cases:
    clip      clip_range 1e-4, max_grad_norm 1.0 (the launch values): the PPO clip shapes the
              second window (its ratios are far outside 1 +- 1e-4 after one step at lr 1e-3,
              since this model's log-probs are means over only 256 elements); the first
              step's norm is below 1, the second's above (clipped).
    gradclip  clip_range 10 (the PPO clip never engages) and max_grad_norm 0.25 x the smaller
              pre-clip norm of the first case, so both optimizer steps clip the norm, by
              different factors (which Adam's second step sees).
"""

import json
import math
import os
import shutil

import diffusers
import safetensors
import safetensors.torch as st
import torch
from diffusers import FluxTransformer2DModel

assert torch.__version__.startswith("2.11.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert safetensors.__version__ == "0.8.0", safetensors.__version__

torch.set_num_threads(1)
OUT = os.path.dirname(os.path.abspath(__file__))

FLUX_CFG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
PX = 32  # 4 image tokens
TXT = 8
S, SHIFT, ETA = 6, 3.0, 0.3
G, GA, FRAC = 4, 2, 0.6
T = int((S - 1) * FRAC)  # 3 of the 5 usable transitions
LR, BETA1, BETA2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-4
ADV_CLIP_MAX = 5.0
GUIDANCE = 3.5
REWARDS = [0.31, 0.27, 0.36, 0.22]


# ---------------------------------------------------------------- ALGORITHM.md sections 2 and 7
def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def img_ids(height, width):
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def sigma_schedule(steps, shift):
    t = torch.linspace(1, 0, steps + 1)
    return (shift * t) / (1 + (shift - 1) * t)


def flux_step(v, x, eta, sigmas, i, prev_sample=None, noise=None):
    """One SDE transition (section 2.4); returns (next latent, x0 prediction, log-prob)."""
    sigma = sigmas[i]
    dsigma = sigmas[i + 1] - sigma
    mean = x + dsigma * v
    x0 = x - sigma * v
    std = eta * math.sqrt(sigma - sigmas[i + 1])
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    if prev_sample is None:
        prev_sample = mean + noise * std
    logp = (-((prev_sample.detach() - mean) ** 2) / (2 * std**2)).mean(dim=tuple(range(1, x.ndim)))
    return prev_sample, x0, logp


def randomize(model, gen):
    # As tests/golden/flux: random values everywhere, so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim == 1 else 1.0 / math.sqrt(p[0].numel())
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name and p.ndim == 1 else 0.0))


class Prompt:
    def __init__(self, gen):
        self.encoder_hidden_states = torch.randn(1, TXT, FLUX_CFG["joint_attention_dim"], generator=gen)
        self.pooled_projections = torch.randn(1, FLUX_CFG["pooled_projection_dim"], generator=gen)
        self.img_ids = img_ids(PX, PX)
        self.txt_ids = torch.zeros(TXT, 3)

    def velocity(self, model, z, t_int):
        return model(
            hidden_states=z,
            encoder_hidden_states=self.encoder_hidden_states,
            pooled_projections=self.pooled_projections,
            timestep=(t_int / 1000).reshape(1),
            guidance=torch.full((1,), GUIDANCE),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]


def rollout(model, prompt, init, step_noise, sigmas, t_int):
    """Section 2.3, one trajectory at a time."""
    lats, logps = [], []
    with torch.no_grad():
        for g in range(G):
            z = init
            traj, lp_g = [z.float()], []
            for i in range(S):
                v = prompt.velocity(model, z, t_int[i])
                z, _, lp = flux_step(v, z.float(), ETA, sigmas, i, noise=step_noise[g, i])
                traj.append(z)
                lp_g.append(lp)
            lats.append(torch.cat(traj, 0))
            logps.append(torch.cat(lp_g, 0))
    return torch.stack(lats), torch.stack(logps)


def train(init_sd, prompt, latents, log_probs, advantages, steps, sigmas, t_int, clip_range, max_grad_norm):
    """Section 5 steps 6-7 / section 12: the update of one iteration on one rank."""
    model = FluxTransformer2DModel(**FLUX_CFG)
    model.load_state_dict(init_sd)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
    opt.zero_grad()
    losses = torch.zeros(G, T)
    ratios = torch.zeros(G, T)
    norms = []
    for g in range(G):
        for j in range(T):
            k = int(steps[g, j])
            v = prompt.velocity(model, latents[g, k][None], t_int[k])
            _, _, logp = flux_step(v, latents[g, k][None].float(), ETA, sigmas, k,
                                   prev_sample=latents[g, k + 1][None].float())
            adv = torch.clamp(advantages[g:g + 1], -ADV_CLIP_MAX, ADV_CLIP_MAX)
            ratio = torch.exp(logp - log_probs[g:g + 1, k])
            unclipped = -adv * ratio
            clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
            loss = torch.mean(torch.maximum(unclipped, clipped)) / (GA * T)
            loss.backward()
            losses[g, j] = loss.detach()
            ratios[g, j] = ratio.detach()[0]
        if (g + 1) % GA == 0:
            # Every parameter has a gradient in every window, so zero_grad's set_to_none (the
            # reference) and the worker's zeroing in place give the same AdamW steps.
            assert all(p.grad is not None for p in model.parameters())
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
            opt.step()
            opt.zero_grad()
    return model, losses, ratios, torch.stack(norms)


def main():
    gen = torch.Generator().manual_seed(20261128)
    tdir = os.path.join(OUT, "transformer")
    if os.path.isdir(tdir):
        shutil.rmtree(tdir)

    # The checkpoint is bf16, like FLUX.1-dev's; training keeps f32 masters of it (section 5).
    model = FluxTransformer2DModel(**FLUX_CFG).eval()
    randomize(model, gen)
    model.to(torch.bfloat16).save_pretrained(tdir, safe_serialization=True)
    model.float()
    init_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    sigmas = sigma_schedule(S, SHIFT)
    t_int = torch.tensor([int(s * 1000) for s in sigmas][:S], dtype=torch.int64)
    prompt = Prompt(gen)
    # init_same_noise: one bf16 draw per iteration, shared by the group (section 2.2).
    init = pack(torch.randn(1, 16, PX // 8, PX // 8, generator=gen).to(torch.bfloat16)).float()
    n_tok = (PX // 16) ** 2
    step_noise = torch.randn(G, S, 1, n_tok, 64, generator=gen)
    latents, log_probs = rollout(model, prompt, init, step_noise, sigmas, t_int)

    rewards = torch.tensor(REWARDS, dtype=torch.float32)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    perm_gen = torch.Generator().manual_seed(7)
    steps = torch.stack([torch.randperm(S - 1, generator=perm_gen)[:T] for _ in range(G)])

    rec = {
        "params": torch.tensor([S, SHIFT, ETA, G, GA, FRAC, LR, BETA1, BETA2, EPS, WD, ADV_CLIP_MAX, GUIDANCE],
                               dtype=torch.float64),
        "sigmas": sigmas, "timesteps": t_int,
        "encoder_hidden_states": prompt.encoder_hidden_states, "pooled_projections": prompt.pooled_projections,
        "img_ids": prompt.img_ids, "txt_ids": prompt.txt_ids,
        "init_noise": init, "step_noise": step_noise,
        "latents": latents, "log_probs": log_probs,
        "rewards": rewards, "advantages": advantages, "steps": steps,
    }

    def run_case(name, clip_range, max_grad_norm):
        m, losses, ratios, norms = train(init_sd, prompt, latents, log_probs, advantages, steps, sigmas,
                                         t_int, clip_range, max_grad_norm)
        rec[f"{name}.hyper"] = torch.tensor([clip_range, max_grad_norm], dtype=torch.float64)
        rec[f"{name}.losses"] = losses
        rec[f"{name}.ratios"] = ratios
        rec[f"{name}.grad_norms"] = norms
        for k, v in m.state_dict().items():
            rec[f"{name}.weight.{k}"] = v.detach().clone()
        dev = (ratios.double() - 1).abs()
        print(f"{name}: clip_range {clip_range:g} max_grad_norm {max_grad_norm:g}")
        print(f"  grad norms {norms.tolist()}")
        print(f"  |r - 1| first window max {dev[:GA].max():.3g}, second window {dev[GA:].tolist()}")
        print(f"  losses {losses.sum(1).tolist()}")
        delta = max((m.state_dict()[k] - init_sd[k]).abs().max().item() for k in init_sd)
        print(f"  max |weight change| {delta:.3g}")
        return ratios, norms

    ratios, norms = run_case("clip", 1e-4, 1.0)
    # One step at lr 1e-3 moves the mean-element log-probs of this tiny model a lot, so the
    # second window's norm exceeds 1 and is clipped while the first's is not.
    assert norms[0] < 1.0 < norms[1], norms
    # The ratios of the second window must sit clearly off the clip boundaries, or a last-bit
    # difference could flip a transition between clipped and not.
    margin = ((ratios[GA:].double() - 1).abs() - 1e-4).abs().min()
    assert margin > 1e-5, f"a ratio lies within {margin} of the clip boundary"
    assert ((ratios[GA:].double() - 1).abs() > 1e-4).any(), "the PPO clip should engage"
    _, norms_b = run_case("gradclip", 10.0, 0.25 * float(norms.min()))
    assert (norms_b > rec["gradclip.hyper"][1]).all()

    st.save_file({k: v.contiguous() for k, v in rec.items()}, os.path.join(OUT, "train_loop.safetensors"))
    total = 0
    for root, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"goldens written: {total / 1e3:.0f} KB")


if __name__ == "__main__":
    main()

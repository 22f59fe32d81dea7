#!/usr/bin/env python3
"""Goldens for the reward aggregation and the trimmed group statistics
(proto/tests/aggregation.rs), from a re-implementation of MixGRPO's formulas
(Tencent-Hunyuan/MixGRPO, fastvideo/train_grpo_flux.py `train_one_step` and
fastvideo/models/reward_model/utils.py `compute_reward`), written from their description:

- weights: w_k / sum_j w_j (the reward weights normalised to sum 1)
- reward_aggr: one reward per sample, 0.0 + r_1 w_1 + r_2 w_2 + ... (Python floats, reward
  order), then one advantage of it
- advantage_aggr: one advantage per reward (MixGRPO then sums them weighted; this project
  weights the clipped losses instead, so the goldens are the per-reward advantages)
- group statistics: with trimmed_ratio > 0 the group's rewards are sorted ascending and the
  lowest min(int(G * ratio), G - 1) left out; mean and unbiased std (+ 1e-8 outside the root)
  of the rest; every member gets (r - mean) / std
- use_group = False (reward_aggr only in MixGRPO): mean and std over every sample, untrimmed
- the advantage is clamped to +-adv_clip_max (where the loss takes it)

Regenerate (from the repository root):

    $(deploy/reference-venv.sh) tests/golden/aggregation/make_goldens.py

Pinned reference: torch 2.11.0 (CPU). Deterministic (a fixed seed).

goldens.json: cases[i] with mix, trimmed_ratio, use_group, num_generations, adv_clip_max,
weights, rewards[member][reward] (f64), and the advantages[member][k] computed in float64
(`f64`) and in float32 as the reference's tensors are (`f32`).
"""

import json
import os

import torch

assert torch.__version__.startswith("2.11.0"), torch.__version__
torch.set_num_threads(1)
OUT = os.path.dirname(os.path.abspath(__file__))


def normalised(weights):
    total = sum(weights)
    return [w / total for w in weights]


def group_stats(r, trimmed_ratio):
    if trimmed_ratio > 0:
        s = torch.sort(r)[0]
        trim = min(int(len(s) * trimmed_ratio), len(s) - 1)
        kept = s[trim:]
        return kept.mean(), kept.std() + 1e-8
    return r.mean(), r.std() + 1e-8


def advantages_of(r, g, use_group, trimmed_ratio):
    """r: [N] rewards of one kind, N = groups * g."""
    if not use_group:
        return (r - r.mean()) / (r.std() + 1e-8)
    out = torch.zeros_like(r)
    for i in range(len(r) // g):
        part = r[i * g : (i + 1) * g]
        mean, std = group_stats(part, trimmed_ratio)
        out[i * g : (i + 1) * g] = (part - mean) / std
    return out


def case(mix, rewards, g, weights, trimmed_ratio, use_group, clip):
    out = {}
    for name, dtype in [("f64", torch.float64), ("f32", torch.float32)]:
        if mix == "reward_aggr":
            w = normalised(weights)
            merged = []
            for row in rewards:
                m = 0.0
                for r, wk in zip(row, w):
                    m += r * wk
                merged.append(m)
            cols = [torch.tensor(merged, dtype=dtype)]
        else:
            cols = [torch.tensor([row[k] for row in rewards], dtype=dtype) for k in range(len(weights))]
        advs = [advantages_of(c, g, use_group, trimmed_ratio).clamp(-clip, clip) for c in cols]
        out[name] = torch.stack(advs, dim=1).to(torch.float64).tolist()
    return {
        "mix": mix,
        "trimmed_ratio": trimmed_ratio,
        "use_group": use_group,
        "num_generations": g,
        "adv_clip_max": clip,
        "weights": weights,
        "rewards": rewards,
        "f64": out["f64"],
        "f32": out["f32"],
    }


def main():
    gen = torch.Generator().manual_seed(20261203)
    cases = []

    def rewards(groups, g, k):
        # HPS-like scores around 0.3 and a second reward on another scale, with a low outlier
        # per group so trimming has something to cut.
        r = torch.randn(groups * g, k, generator=gen, dtype=torch.float64)
        r[:, 0] = 0.3 + 0.02 * r[:, 0]
        if k > 1:
            r[:, 1] = 25.0 + 3.0 * r[:, 1]
        for i in range(groups):
            r[i * g, :] -= torch.tensor([0.1, 12.0][:k], dtype=torch.float64)
        return r.tolist()

    # HPS : CLIP = 0.7 : 1.4 (DanceGRPO issue #19), groups of 12 as the launch.
    r12 = rewards(3, 12, 2)
    for mix in ["advantage_aggr", "reward_aggr"]:
        for ratio in [0.0, 0.1, 0.25, 0.5, 0.85]:
            cases.append(case(mix, r12, 12, [0.7, 1.4], ratio, True, 5.0))
    # A tight clamp, so it is active.
    for mix in ["advantage_aggr", "reward_aggr"]:
        cases.append(case(mix, r12, 12, [0.7, 1.4], 0.25, True, 1.2))
    # Three rewards, uneven weights, one of them 0; small groups with ties.
    r4 = rewards(4, 4, 2)
    r4 = [[a, b, float(i % 2)] for i, (a, b) in enumerate(r4)]
    for mix in ["advantage_aggr", "reward_aggr"]:
        for ratio in [0.0, 0.3, 0.5]:
            cases.append(case(mix, r4, 4, [1.0, 0.0, 2.5], ratio, True, 5.0))
    # One reward: the two mixes agree.
    r1 = rewards(2, 6, 1)
    for mix in ["advantage_aggr", "reward_aggr"]:
        cases.append(case(mix, r1, 6, [1.0], 0.2, True, 5.0))
    # Global normalisation (use_group = false), untrimmed.
    for mix in ["advantage_aggr", "reward_aggr"]:
        cases.append(case(mix, r12, 12, [0.7, 1.4], 0.0, False, 5.0))
    with open(os.path.join(OUT, "goldens.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

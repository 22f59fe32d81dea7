#!/usr/bin/env python3
"""Golden file for the worker's AdamW and grad-norm clip (worker/tests/train_optim.rs).

Regenerate (from the repository root; the first command installs the pinned packages into the
project venv and prints its python):

    $(deploy/reference-venv.sh) tests/golden/train/make_goldens.py

Pinned reference: torch 2.11.0 (CPU). Deterministic (fixed seed, CPU, one thread).

adamw.safetensors: three f32 parameters trained for STEPS steps by the real
`torch.optim.AdamW(foreach=False)` after `torch.nn.utils.clip_grad_norm_` each step, with
`zero_grad(set_to_none=False)` in between (the worker's zero_grad keeps gradients allocated).
- cfg                     [lr, beta1, beta2, eps, weight_decay, max_norm] (f64)
- init.<p>                initial values
- grad.<s>.<p>            the gradient given at step s (1-based); absent = no gradient (None),
                          which torch skips. `b` has no gradient in steps 1-2 (its per-parameter
                          step count lags), `c` gets an all-zero gradient at step 3.
- norm.<s>                clip_grad_norm_'s return value (f32 scalar)
- param.<s>.<p>           the parameter after step s
- exp_avg.<p>, exp_avg_sq.<p>  final optimizer state
Gradient scales vary per step so that clipping is active at some steps and not at others.
"""

import os

import safetensors.torch as st
import torch

assert torch.__version__.startswith("2.11.0"), torch.__version__
torch.set_num_threads(1)
OUT = os.path.dirname(os.path.abspath(__file__))

LR, BETA1, BETA2, EPS, WD, MAX_NORM = 1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0
SHAPES = {"a": (4, 3), "b": (5,), "c": (2, 3, 2)}
SCALES = [0.1, 3.0, 0.5, 10.0, 0.05, 2.0]
STEPS = len(SCALES)


def main():
    gen = torch.Generator().manual_seed(20260701)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}
    out = {"cfg": torch.tensor([LR, BETA1, BETA2, EPS, WD, MAX_NORM], dtype=torch.float64)}
    out.update({f"init.{n}": p.detach().clone() for n, p in params.items()})
    opt = torch.optim.AdamW(
        list(params.values()), lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, foreach=False
    )
    for s in range(1, STEPS + 1):
        for n, p in params.items():
            if n == "b" and s <= 2:
                continue
            g = torch.randn(SHAPES[n], generator=gen) * SCALES[s - 1]
            if n == "c" and s == 3:
                g = torch.zeros(SHAPES[n])
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            out[f"grad.{s}.{n}"] = g
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)
        out[f"norm.{s}"] = norm.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=False)
        out.update({f"param.{s}.{n}": p.detach().clone() for n, p in params.items()})
    for n, p in params.items():
        out[f"exp_avg.{n}"] = opt.state[p]["exp_avg"].clone()
        out[f"exp_avg_sq.{n}"] = opt.state[p]["exp_avg_sq"].clone()
    assert opt.state[params["b"]]["step"].item() == STEPS - 2
    st.save_file(out, os.path.join(OUT, "adamw.safetensors"))


if __name__ == "__main__":
    main()

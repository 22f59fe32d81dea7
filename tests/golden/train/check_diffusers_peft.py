#!/usr/bin/env python3
"""Loads what the worker's checkpoint writers saved with the Python libraries and runs it.
Called by worker/tests/train_checkpoint.rs; exits non-zero on any mismatch.

    check_diffusers_peft.py transformer CKPT_DIR INPUTS EXPECTED
        FluxTransformer2DModel.from_pretrained(CKPT_DIR, subfolder="transformer")
    check_diffusers_peft.py lora BASE_DIR ADAPTER_DIR INPUTS EXPECTED
        PeftModel.from_pretrained(<base from BASE_DIR/transformer>, ADAPTER_DIR); every LoRA
        tensor PEFT ends up with must equal the file's (PEFT only warns about unmatched keys)

INPUTS is a safetensors file of transformer inputs (tests/golden/flux/forward_f32_sq.safetensors);
the forward output must match EXPECTED's `output` (what the Rust model computed) to 1e-5 of
its scale.
"""

import sys

import safetensors.torch as st
import torch
from diffusers import FluxTransformer2DModel

INPUT_KEYS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
              "guidance", "img_ids", "txt_ids")


def compare(model, inputs, expected):
    inp = st.load_file(inputs)
    with torch.no_grad():
        out = model(**{k: inp[k] for k in INPUT_KEYS}, return_dict=False)[0]
    want = st.load_file(expected)["output"]
    err = ((out - want).abs().max() / want.abs().max()).item()
    print(f"relative max error {err:.3e}")
    if not err <= 1e-5:
        sys.exit(f"forward differs from the Rust model: {err}")


def main():
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "transformer":
        ckpt, inputs, expected = sys.argv[2:5]
        model = FluxTransformer2DModel.from_pretrained(ckpt, subfolder="transformer").eval()
        if model.dtype != torch.float32:
            sys.exit(f"loaded dtype {model.dtype}")
        compare(model, inputs, expected)
    elif mode == "lora":
        from peft import PeftModel, get_peft_model_state_dict

        base, adapter, inputs, expected = sys.argv[2:6]
        model = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
        model = PeftModel.from_pretrained(model, adapter).eval()
        saved = st.load_file(f"{adapter}/adapter_model.safetensors")
        loaded = get_peft_model_state_dict(model)
        if set(loaded) != set(saved):
            sys.exit(f"key sets differ: only in PEFT {sorted(set(loaded) - set(saved))}, "
                     f"only in file {sorted(set(saved) - set(loaded))}")
        for k, v in saved.items():
            if not torch.equal(loaded[k], v):
                sys.exit(f"{k}: PEFT holds other values than the file")
        compare(model, inputs, expected)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

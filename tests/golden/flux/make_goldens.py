#!/usr/bin/env python3
"""Golden files for the FLUX transformer, the FLUX VAE decoder and the DanceGRPO SDE sampler.

Regenerate (from the repository root; the first command installs the pinned packages into the
project venv and prints its python):

    $(deploy/reference-venv.sh) tests/golden/flux/make_goldens.py

Pinned reference: torch 2.11.0 (CPU), diffusers 0.42.1, safetensors 0.8.0 (see
deploy/reference-venv.sh). The script is deterministic (fixed seeds, CPU, one thread) and
asserts these versions, so a rerun reproduces the committed files.

What it writes, next to itself:
- tiny/transformer/        diffusers layout: config.json, a 2-shard safetensors folder + index
- tiny/flux-bfl.safetensors the same weights in the BFL single-file layout, with the
                           `model.diffusion_model.` prefix (converted here, then checked by loading
                           it back through diffusers' own BFL converter)
- tiny/vae/                AutoencoderKL with the FLUX VAE structure (16 latent channels, no
                           quant convs, scaling/shift factors), tiny widths
- forward_f32.safetensors  transformer inputs + output, batch 2, 48x80 px (non-square)
- forward_f32_sq.safetensors  batch 1, 32x32 px
- forward_bf16.safetensors the batch-2 inputs and output with model and inputs in bf16
- vae_decode.safetensors   packed latents -> unpacked -> decode -> image in [-1,1] and uint8
- sampler.safetensors      a 4-step rollout (shift 3, eta 0.3) with all noise stored, the
                           per-step latents, log-probs, means and x0, and the recomputed log-probs
- sde_step.safetensors     one SDE step on random v/x at several step indices (formula only)
- latents.safetensors      pack / unpack / img_ids for 48x80

The sampler formulas are written here from docs/ALGORITHM.md section 2 (they are the DanceGRPO
reference's `flux_step`, which is not a diffusers API).
"""

import json
import math
import os
import shutil

import diffusers
import safetensors
import safetensors.torch as st
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor

assert torch.__version__.startswith("2.11.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert safetensors.__version__ == "0.8.0", safetensors.__version__

torch.set_num_threads(1)
OUT = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(OUT, "tiny")

FLUX_CFG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
TXT_LEN = 7


def save(name, tensors):
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, name))


# ---------------------------------------------------------------- latents (ALGORITHM.md section 7)
def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, height, width):
    b, n, c = x.shape
    h, w = 2 * (height // 16), 2 * (width // 16)
    return x.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h, w)


def img_ids(height, width):
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


# ---------------------------------------------------------------- sampler (ALGORITHM.md section 2)
def sd3_time_shift(shift, t):
    return (shift * t) / (1 + (shift - 1) * t)


def sigma_schedule(steps, shift):
    return sd3_time_shift(shift, torch.linspace(1, 0, steps + 1))


def flux_step(v, x, eta, sigmas, i, prev_sample=None, noise=None):
    """One SDE transition; returns (next latent, x0 prediction, log-prob, mean)."""
    sigma = sigmas[i]
    dsigma = sigmas[i + 1] - sigma
    mean = x + dsigma * v
    x0 = x - sigma * v
    std = eta * math.sqrt(sigma - sigmas[i + 1])
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    if prev_sample is None:
        prev_sample = mean + noise * std
    # Per-element mean; the constant -log(s) - log(sqrt(2 pi)) terms are left out as at the
    # reference commit (they cancel in the PPO ratio).
    logp = (-((prev_sample.detach() - mean) ** 2) / (2 * std**2)).mean(dim=tuple(range(1, x.ndim)))
    return prev_sample, x0, logp, mean


def bfl_from_diffusers(sd, cfg):
    """diffusers -> BFL single-file keys (MODELS.md 1.6, reverse direction)."""
    out = {}
    ren = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "proj_out": "final_layer.linear",
    }
    for a, b in ren.items():
        for s in ("weight", "bias"):
            out[f"{b}.{s}"] = sd[f"{a}.{s}"]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    for s in ("weight", "bias"):
        w = sd[f"norm_out.linear.{s}"]
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([w[d:], w[:d]])
    for i in range(cfg["num_layers"]):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            out[q + f"img_mod.lin.{s}"] = sd[p + f"norm1.linear.{s}"]
            out[q + f"txt_mod.lin.{s}"] = sd[p + f"norm1_context.linear.{s}"]
            out[q + f"img_attn.qkv.{s}"] = torch.cat([sd[p + f"attn.to_{n}.{s}"] for n in "qkv"])
            out[q + f"txt_attn.qkv.{s}"] = torch.cat([sd[p + f"attn.add_{n}_proj.{s}"] for n in "qkv"])
            out[q + f"img_attn.proj.{s}"] = sd[p + f"attn.to_out.0.{s}"]
            out[q + f"txt_attn.proj.{s}"] = sd[p + f"attn.to_add_out.{s}"]
            out[q + f"img_mlp.0.{s}"] = sd[p + f"ff.net.0.proj.{s}"]
            out[q + f"img_mlp.2.{s}"] = sd[p + f"ff.net.2.{s}"]
            out[q + f"txt_mlp.0.{s}"] = sd[p + f"ff_context.net.0.proj.{s}"]
            out[q + f"txt_mlp.2.{s}"] = sd[p + f"ff_context.net.2.{s}"]
        out[q + "img_attn.norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "img_attn.norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
        out[q + "txt_attn.norm.query_norm.scale"] = sd[p + "attn.norm_added_q.weight"]
        out[q + "txt_attn.norm.key_norm.scale"] = sd[p + "attn.norm_added_k.weight"]
    for i in range(cfg["num_single_layers"]):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[q + f"linear1.{s}"] = torch.cat(
                [sd[p + f"attn.to_{n}.{s}"] for n in "qkv"] + [sd[p + f"proj_mlp.{s}"]]
            )
            out[q + f"linear2.{s}"] = sd[p + f"proj_out.{s}"]
            out[q + f"modulation.lin.{s}"] = sd[p + f"norm.linear.{s}"]
        out[q + "norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def randomize(model, gen):
    # Default init leaves the norms at 1 and some layers at 0; random values everywhere make
    # every weight matter (a swapped or missing key changes the output).
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim == 1 else 1.0 / math.sqrt(p[0].numel())
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name and p.ndim == 1 else 0.0))


def flux_inputs(gen, batch, height, width):
    n = (height // 16) * (width // 16)
    return dict(
        hidden_states=torch.randn(batch, n, 64, generator=gen),
        encoder_hidden_states=torch.randn(batch, TXT_LEN, FLUX_CFG["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(batch, FLUX_CFG["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.75, 0.3][:batch]),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids(height, width),
        txt_ids=torch.zeros(TXT_LEN, 3),
    )


def main():
    gen = torch.Generator().manual_seed(20260401)
    if os.path.isdir(TINY):
        shutil.rmtree(TINY)
    os.makedirs(TINY)

    # ---------------------------------------------------------------- transformer
    model = FluxTransformer2DModel(**FLUX_CFG).eval()
    randomize(model, gen)
    tdir = os.path.join(TINY, "transformer")
    model.save_pretrained(tdir, safe_serialization=True, max_shard_size="200KB")
    assert os.path.exists(os.path.join(tdir, "diffusion_pytorch_model.safetensors.index.json")), "not sharded"
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = {"model.diffusion_model." + k: v for k, v in bfl_from_diffusers(sd, FLUX_CFG).items()}
    bfl_path = os.path.join(TINY, "flux-bfl.safetensors")
    st.save_file(bfl, bfl_path)
    # Cross-check the hand conversion with diffusers' own BFL -> diffusers converter.
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    try:
        back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    except Exception as e:  # its converter hard-codes inner_dim 3072 (MODELS.md 1.6)
        back = None
        print("diffusers converter not usable on the tiny config:", type(e).__name__, e)
    if back is not None and all(back[k].shape == sd[k].shape for k in sd):
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd), "BFL round trip differs"
        print("BFL file round-trips through diffusers' converter")

    def run(m, inp):
        with torch.no_grad():
            return m(**inp, return_dict=False)[0]

    inp = flux_inputs(gen, 2, 48, 80)
    save("forward_f32.safetensors", {**inp, "output": run(model, inp)})
    inp_sq = flux_inputs(gen, 1, 32, 32)
    save("forward_f32_sq.safetensors", {**inp_sq, "output": run(model, inp_sq)})
    mbf = FluxTransformer2DModel(**FLUX_CFG).eval()
    mbf.load_state_dict(sd)
    mbf = mbf.to(torch.bfloat16)
    inp_bf = {k: (v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
              for k, v in inp.items()}
    save("forward_bf16.safetensors", {**inp_bf, "output": run(mbf, inp_bf)})

    # ---------------------------------------------------------------- VAE
    vae = AutoencoderKL(**VAE_CFG).eval()
    randomize(vae, gen)
    vae.save_pretrained(os.path.join(TINY, "vae"), safe_serialization=True)
    lat = torch.randn(2, 16, 6, 10, generator=gen)
    packed = pack(lat)
    assert torch.equal(unpack(packed, 48, 80), lat)
    with torch.no_grad():
        z = unpack(packed, 48, 80) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
    proc = VaeImageProcessor(vae_scale_factor=8)
    as_np = proc.postprocess(image, output_type="np")
    u8 = torch.from_numpy((as_np * 255).round().astype("uint8"))  # numpy_to_pil's quantisation
    save("vae_decode.safetensors", {"packed_latents": packed, "image": image, "image_u8": u8})

    # ---------------------------------------------------------------- latents
    save("latents.safetensors", {"latents": lat, "packed": packed, "img_ids": img_ids(48, 80)})

    # ---------------------------------------------------------------- sampler
    steps, shift, eta = 4, 3.0, 0.3
    sigmas = sigma_schedule(steps, shift)
    t_int = torch.tensor([int(s * 1000) for s in sigmas][:steps], dtype=torch.int64)
    b = 2
    init = pack(torch.randn(1, 16, 6, 10, generator=gen)).repeat(b, 1, 1)  # init_same_noise
    step_noise = torch.randn(steps, b, 15, 64, generator=gen)
    cond = flux_inputs(gen, b, 48, 80)
    z = init
    lats, logps, means, x0s = [z], [], [], []
    for i in range(steps):
        c = dict(cond, hidden_states=z, timestep=(t_int[i] / 1000).repeat(b))
        v = run(model, c)
        z, x0, lp, mu = flux_step(v, z.float(), eta, sigmas, i, noise=step_noise[i])
        lats.append(z)
        logps.append(lp)
        means.append(mu)
        x0s.append(x0)
    lats = torch.stack(lats, 1)
    recomputed = []
    for i in range(steps):
        c = dict(cond, hidden_states=lats[:, i], timestep=(t_int[i] / 1000).repeat(b))
        v = run(model, c)
        recomputed.append(flux_step(v, lats[:, i].float(), eta, sigmas, i, prev_sample=lats[:, i + 1])[2])
    save("sampler.safetensors", {
        "sigmas": sigmas, "timesteps": t_int, "init_noise": init[:1], "step_noise": step_noise,
        "encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"],
        "guidance": cond["guidance"], "img_ids": cond["img_ids"], "txt_ids": cond["txt_ids"],
        "latents": lats, "log_probs": torch.stack(logps, 1), "means": torch.stack(means, 1),
        "x0": torch.stack(x0s, 1), "log_probs_recomputed": torch.stack(recomputed, 1),
        "params": torch.tensor([steps, shift, eta], dtype=torch.float64),
    })

    # ---------------------------------------------------------------- one SDE step, formula only
    sig16 = sigma_schedule(16, 3.0)
    rec = {"sigmas": sig16, "eta": torch.tensor([0.3], dtype=torch.float64)}
    for i in (0, 7, 15):
        v = torch.randn(2, 15, 64, generator=gen)
        x = torch.randn(2, 15, 64, generator=gen)
        noise = torch.randn(2, 15, 64, generator=gen)
        nxt, x0, lp, mu = flux_step(v, x, 0.3, sig16, i, noise=noise)
        rec.update({f"v_{i}": v, f"x_{i}": x, f"noise_{i}": noise, f"next_{i}": nxt, f"x0_{i}": x0,
                    f"logp_{i}": lp, f"mean_{i}": mu})
    save("sde_step.safetensors", rec)

    total = 0
    for root, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"goldens written: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Golden files for the transformers-layout CLIP rewards (issue 14, part 1): `pickscore`
(PickScore_v1, a ViT-H-14 with exact GELU) and `clip_score` (OpenAI CLIP ViT-L/14, quick GELU),
each as a tiny random `CLIPModel` saved as the Hugging Face folder users have on disk.

Reproduce (from the repository root):
    PY=$(deploy/reference-venv.sh)            # torch 2.11.0, transformers 5.24.0, tokenizers 0.23.3
    $PY tests/golden/hf_clip/make_goldens.py  # rewrites tests/golden/hf_clip/*

Ground truth is transformers itself: `CLIPProcessor.from_pretrained(folder)` (its
`CLIPImageProcessor`: shortest edge resize, bicubic with antialiasing on the uint8 image, center
crop, rescale + normalise; its `CLIPTokenizer`: NFC, whitespace, lower-case, CLIP BPE, BOS/EOS,
truncation to 77) and `CLIPModel.from_pretrained(folder)`'s `get_image_features` /
`get_text_features`. The score of both rewards is `logit_scale.exp() * cos(image, text)`, the
diagonal of `CLIPModel(...).logits_per_image`.

Everything is seeded and runs on the CPU in fp32. Weights are rounded to fp16 and stored in fp16
to keep the folders small; the Python forward uses the rounded values in fp32.

Per model folder (pickscore_tiny/, clip_tiny/), as users have it:
- config.json, model.safetensors            `save_pretrained` (safetensors)
- pytorch_model.bin                         `torch.save(model.state_dict())`, plus the
                                            `*.embeddings.position_ids` buffers older
                                            transformers versions kept in the state dict
- preprocessor_config.json                  `CLIPImageProcessor.save_pretrained`
- vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                            a tiny CLIP BPE (all 512 byte symbols, merges learnt
                                            from the prompts) saved by `CLIPTokenizer`
goldens.safetensors: `images` (uint8 [N, H, W, 3]) and, per model `<m>.`: `pixel_values`,
`input_ids` (int64, padded to 77 with the pad id), `image_embeds`, `text_embeds` (projected, not
normalised), `scores` (f64). prompts.json: the prompts, in order.
"""
import json
import os
import shutil

import numpy as np
import regex as re
import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = [
    "A photo of a red fox in the snow",
    "an  astronaut riding a horse,\tdigital art",
    "Café au lait & croissants — Paris, 1920s",
    "ÅNGSTRÖM  ΣΟΦΙΑ ﬁne ｆｕｌｌ",
    # Longer than the 77-token context: truncated to BOS + 75 tokens + EOS.
    " ".join(["photograph of a tiny dog"] * 20),
]

MODELS = {
    # PickScore_v1 / open_clip ViT-H-14: exact GELU; a config written by a current transformers
    # (eos_token_id is the real EOS id: pooled at its first position).
    "pickscore_tiny": dict(hidden_act="gelu", eos_legacy=False, logit_scale=4.6052,
                           image=32, patch=8, crop=32, shortest=32),
    # OpenAI CLIP ViT-L/14: quick GELU; its config carries the legacy eos_token_id 2 (pooled at
    # the argmax id). Non-square crop source: shortest edge 36, crop 32.
    "clip_tiny": dict(hidden_act="quick_gelu", eos_legacy=True, logit_scale=4.6052,
                      image=32, patch=8, crop=32, shortest=36),
}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return list(zip(bs, [chr(c) for c in cs]))


def tiny_bpe(prompts, n_merges=60):
    """A CLIP-ordered vocabulary (bytes, bytes + </w>, merges, BOS, EOS) with merges learnt
    greedily from the prompts' pre-tokens."""
    table = bytes_to_unicode()
    enc = dict(table)
    pat = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    words = {}
    for p in prompts:
        for w in pat.findall(re.sub(r"\s+", " ", p).lower()):
            sym = [enc[b] for b in w.encode("utf-8")]
            sym[-1] += "</w>"
            words[tuple(sym)] = words.get(tuple(sym), 0) + 1
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda k: pairs[k])
        merges.append(best)
        new = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    vocab = [c for _, c in table] + [c + "</w>" for _, c in table] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def images():
    g = torch.Generator().manual_seed(1)
    # A smooth gradient plus noise (so bicubic overshoot and uint8 rounding both happen), in three
    # shapes: landscape, portrait (crop along the long side) and square.
    out = []
    for h, w in [(40, 56), (61, 45), (48, 48)]:
        y = torch.linspace(0, 1, h)[:, None, None]
        x = torch.linspace(0, 1, w)[None, :, None]
        c = torch.tensor([0.2, 0.5, 0.8])[None, None, :]
        base = 255 * (0.5 * y + 0.3 * x * c + 0.2 * c)
        noise = torch.randint(-60, 61, (h, w, 3), generator=g)
        out.append((base + noise).clamp(0, 255).to(torch.uint8))
    return out


def save_tokenizer(folder, vocab, merges):
    tmp = os.path.join(folder, "_tok")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab_file=os.path.join(tmp, "vocab.json"),
                        merges_file=os.path.join(tmp, "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    for f in ["vocab.json", "merges.txt"]:
        shutil.copyfile(os.path.join(tmp, f), os.path.join(folder, f))
    shutil.rmtree(tmp)
    # Users' folders (openai/clip-vit-large-patch14, the laion processor) carry vocab.json +
    # merges.txt; the reference below reads exactly those, not a tokenizer.json.
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        os.remove(os.path.join(folder, "tokenizer.json"))
    if not os.path.exists(os.path.join(folder, "special_tokens_map.json")):
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump(special, f, indent=2)


def make_model(name, spec, vocab, merges, imgs, goldens):
    folder = os.path.join(HERE, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act=spec["hidden_act"],
                bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos,
                eos_token_id=2 if spec["eos_legacy"] else eos)
    vision = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=spec["image"], patch_size=spec["patch"], hidden_act=spec["hidden_act"])
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8,
                     logit_scale_init_value=spec["logit_scale"])
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Random weights of a larger scale than the init so every layer matters, rounded to
            # what fp16 can hold.
            p.copy_((torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 16 else 0))
                    .half().float())
        model.logit_scale.copy_(torch.tensor(spec["logit_scale"]).half().float())
    model.half().save_pretrained(folder, safe_serialization=True)
    sd = model.state_dict()
    for tower, n in [("text_model", 77), ("vision_model", (spec["image"] // spec["patch"]) ** 2 + 1)]:
        sd[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    model.float()

    CLIPImageProcessor(size={"shortest_edge": spec["shortest"]},
                       crop_size={"height": spec["crop"], "width": spec["crop"]}).save_pretrained(folder)
    save_tokenizer(folder, vocab, merges)

    proc = CLIPProcessor.from_pretrained(folder)
    ref = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(proc.image_processor).__name__ == "CLIPImageProcessor", type(proc.image_processor)
    px = proc(images=[i.numpy() for i in imgs], return_tensors="pt")["pixel_values"]
    # padding="max_length" (Flow-GRPO's CLIP scorer) and padding=True (PickScore's) pool the same
    # EOS state under the causal mask; the golden keeps the 77-wide ids.
    tok = proc(text=PROMPTS, padding="max_length", truncation=True, max_length=77,
               return_tensors="pt")
    tok_short = proc(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=px)
        txt = ref.get_text_features(**tok)
        txt_short = ref.get_text_features(**tok_short)
        if not isinstance(img, torch.Tensor):
            img, txt, txt_short = img.pooler_output, txt.pooler_output, txt_short.pooler_output
        assert torch.allclose(txt, txt_short, atol=1e-6)
        n = lambda t: t / t.norm(p=2, dim=-1, keepdim=True)
        n_img = len(imgs)
        scores = ref.logit_scale.exp() * (n(img) * n(txt[:n_img])).sum(-1)
        full = ref(pixel_values=px, input_ids=tok["input_ids"][:n_img],
                   attention_mask=tok["attention_mask"][:n_img])
        assert torch.allclose(full.logits_per_image.diagonal(), scores, atol=1e-4)
    goldens[f"{name}.pixel_values"] = px.contiguous()
    goldens[f"{name}.input_ids"] = tok["input_ids"].to(torch.int64).contiguous()
    goldens[f"{name}.image_embeds"] = img.contiguous()
    goldens[f"{name}.text_embeds"] = txt.contiguous()
    goldens[f"{name}.scores"] = scores.double().contiguous()
    print(name, "scores", scores.tolist())


def main():
    vocab, merges = tiny_bpe(PROMPTS)
    imgs = images()
    goldens = {}
    for name, spec in MODELS.items():
        make_model(name, spec, vocab, merges, imgs, goldens)
    # The three images are scored against the first three prompts; the tokenizer goldens cover
    # all five.
    for i, im in enumerate(imgs):
        goldens[f"images.{i}"] = im.contiguous()
    save_file(goldens, os.path.join(HERE, "goldens.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    with open(os.path.join(HERE, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(PROMPTS, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()

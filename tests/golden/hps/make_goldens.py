#!/usr/bin/env python3
"""Golden files for the HPS-v2.1 reward (issue 5): a tiny ViT-H-14-shaped open_clip model,
its features and scores, tokenizer ids for tricky prompts, and HPSv2 preprocessing.

Reproduce (from the repository root):
    PY=$(deploy/reference-venv.sh)          # torch 2.11.0, open-clip-torch 3.3.0, ftfy 6.3.1, ...
    $PY tests/golden/hps/make_goldens.py    # rewrites tests/golden/hps/*

Ground truth is the installed source of HPSv2 itself (PyPI `hpsv2==1.2.0`, the package
DanceGRPO's reward imports): its open_clip fork's `CLIP` model, `tokenize` and the
`preprocess_val` transform (`image_transform(..., resize_longest_max=True)`). The package is
installed with `--no-deps` into a private cache directory (its pins would downgrade the venv),
and its modules are imported without running `hpsv2/__init__.py` (which needs the hub).
open-clip-torch 3.3.0 is used as a cross-check: same features, same token ids.

Everything is seeded (torch.manual_seed(0)) and runs on the CPU in fp32, so the output is
reproducible. Weights are rounded to fp16 and stored in fp16 (as a "compressed" checkpoint
would be) to stay inside the 3 MB golden budget; the Python forward uses the same rounded
values in fp32.

Files written:
- tiny_hps/open_clip_config.json      model config (open_clip format)
- tiny_hps/HPS_v2.1_compressed.pt      torch.save({'state_dict': model.state_dict()}) (zip, fp16)
- tiny_hps/HPS_v2.1_compressed.safetensors   the same state dict as safetensors
- tiny_hps/bpe_simple_vocab_16e6.txt.gz       the BPE vocabulary shipped in open-clip-torch
- tiny_hps/prompts.txt, tiny_hps/images.safetensors   inputs in the `check hps-score` format
- goldens.safetensors  images, pixels, tokens, image/text features (normalised), scores,
                       tricky-prompt token ids
- tricky_prompts.json  the tricky prompts, in order
- bad/list_root.pt, bad/int_entry.pt  malformed checkpoints for the loader's error paths
"""
import copy
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tiny_hps")
HPSV2_VERSION = "1.2.0"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
HPSV2_DIR = os.path.expanduser(f"~/.cache/dancegrpo/hpsv2-{HPSV2_VERSION}")


def import_hpsv2():
    """Imports hpsv2's open_clip fork modules from the pinned wheel, skipping package inits."""
    if not os.path.isdir(os.path.join(HPSV2_DIR, "hpsv2")):
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--target", HPSV2_DIR, f"hpsv2=={HPSV2_VERSION}"])
    root = os.path.join(HPSV2_DIR, "hpsv2")
    # The hpsv2 wheel does not ship the BPE vocabulary its tokenizer opens at import time;
    # it is the same file open-clip-torch ships (checked by hash).
    vocab = os.path.join(root, "src", "open_clip", "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(vocab):
        import open_clip
        src = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
        with open(src, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == VOCAB_SHA256
        shutil.copyfile(src, vocab)
    for name, path in [("hpsv2", root), ("hpsv2.src", os.path.join(root, "src")),
                       ("hpsv2.src.open_clip", os.path.join(root, "src", "open_clip"))]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    model = importlib.import_module("hpsv2.src.open_clip.model")
    tok = importlib.import_module("hpsv2.src.open_clip.tokenizer")
    transform = importlib.import_module("hpsv2.src.open_clip.transform")
    constants = importlib.import_module("hpsv2.src.open_clip.constants")
    return model, tok, transform, constants


# ViT-H-14's tree (same keys, same structure), tiny widths. The text tower keeps the real
# vocabulary (49408 rows, so real token ids work) with a very narrow width to stay small.
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 4, "heads": 2, "layers": 2},
}

PROMPTS = [
    "A photo of a red fox in the snow",
    "an astronaut riding a horse, digital art",
    "Café au lait & croissants — Paris, 1920s",
]

TRICKY = [
    "A   Mixed CASE   prompt\twith\n\nrepeated   spaces",
    "Tom &amp; Jerry &lt;3 &quot;cartoon&quot; &#39;classic&#39; &eacute;t&eacute; &amp;amp; &hellip",
    "naïve café, Ärger, straße, ﬁne ﬂowers, Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "東京の夜景 and 北京 and Москва and Αθήνα",
    "emoji party 🎉🔥👍🏽 family 👨‍👩‍👧 flags 🇯🇵",
    "“curly quotes” and ‘single’ ones, it's, you're, we'll, I'd, they've, I'm",
    "numbers 12345 3.14159 and symbols !!! ??? @#$%^&*() ...",
    " ".join(["a long prompt that keeps going"] * 20),
    "<start_of_text> literal special tokens <end_of_text> inside",
    "under_score-hyphen/slash\\back `tick` ~tilde |pipe",
]


def main():
    model_mod, tok_mod, transform_mod, constants = import_hpsv2()
    import open_clip  # cross-check only

    torch.manual_seed(0)
    model = model_mod.CLIP(CONFIG["embed_dim"], CONFIG["vision_cfg"], CONFIG["text_cfg"],
                           quick_gelu=False, output_dict=True)
    # Random, non-trivial weights everywhere (open_clip's init leaves some at 0 or 1), rounded
    # to fp16 so the stored fp16 checkpoint is exact.
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.dim() < 2 else 1.0 / max(1.0, p.shape[-1]) ** 0.5
            p.copy_((torch.randn_like(p) * scale + (1.0 if name.endswith(("ln_1.weight",
                     "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight"))
                     else 0.0)).half().float())
    model.eval()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd16 = {k: v.half() for k, v in sd.items()}

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "open_clip_config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    # Written the way real checkpoints are: `model.state_dict()`, an OrderedDict with
    # `_metadata`, not a plain dict of our own.
    sd16_module = copy.deepcopy(model).half().state_dict()
    assert list(sd16_module) == list(sd16) and all(
        torch.equal(sd16_module[k], sd16[k]) and sd16_module[k].dtype == sd16[k].dtype
        for k in sd16)
    torch.save({"state_dict": sd16_module}, os.path.join(OUT, "HPS_v2.1_compressed.pt"))
    save_file(sd16, os.path.join(OUT, "HPS_v2.1_compressed.safetensors"))
    # Malformed checkpoints for the loader's error paths: a list at the root, and a
    # non-tensor inside the state dict.
    bad = os.path.join(HERE, "bad")
    os.makedirs(bad, exist_ok=True)
    torch.save([torch.zeros(2)], os.path.join(bad, "list_root.pt"))
    torch.save({"state_dict": {"logit_scale": torch.zeros(()), "epoch": 3}},
               os.path.join(bad, "int_entry.pt"))
    vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    shutil.copyfile(vocab, os.path.join(OUT, "bpe_simple_vocab_16e6.txt.gz"))

    # Images: square at the model size, landscape (downscaled + padded), portrait (upscaled +
    # padded). Smooth gradients plus noise, so resampling differences would show.
    g = torch.Generator().manual_seed(1)
    shapes = [(28, 28), (37, 23), (20, 33)]  # (width, height) as PIL sizes them
    images = []
    for w, h in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / (w + h)], -1)
        noise = torch.rand(h, w, 3, generator=g).numpy() * 0.5
        images.append(np.clip((base * 0.6 + noise) * 255, 0, 255).round().astype(np.uint8))

    preprocess_val = transform_mod.image_transform(
        CONFIG["vision_cfg"]["image_size"], is_train=False,
        mean=constants.OPENAI_DATASET_MEAN, std=constants.OPENAI_DATASET_STD,
        resize_longest_max=True)
    pixels = torch.stack([preprocess_val(Image.fromarray(im)) for im in images])

    tokens = tok_mod.tokenize(PROMPTS)
    with torch.no_grad():
        out = model(pixels, tokens)
        img_f, txt_f = out["image_features"], out["text_features"]
        scores = torch.diagonal(img_f @ txt_f.T)

        # Cross-check against open-clip-torch 3.3.0 with the same weights.
        oc = open_clip.CLIP(CONFIG["embed_dim"], CONFIG["vision_cfg"], CONFIG["text_cfg"],
                            quick_gelu=False, output_dict=True)
        oc.load_state_dict(sd)
        oc.eval()
        oc_out = oc(pixels, tokens)
        assert torch.allclose(oc_out["image_features"], img_f, atol=1e-5)
        assert torch.allclose(oc_out["text_features"], txt_f, atol=1e-5)

    tricky = tok_mod.tokenize(TRICKY)
    assert torch.equal(tricky, open_clip.tokenize(TRICKY)), "hpsv2 and open_clip tokenizers differ"
    assert (tricky[7] != 0).all() and tricky[7, -1] == 49407, "long prompt must be truncated"

    save_file({
        "images_0": torch.from_numpy(images[0]),
        "images_1": torch.from_numpy(images[1]),
        "images_2": torch.from_numpy(images[2]),
        "pixels": pixels.contiguous(),
        "tokens": tokens.contiguous(),
        "image_features": img_f.contiguous(),
        "text_features": txt_f.contiguous(),
        "scores": scores.contiguous(),
        "tricky_tokens": tricky.contiguous(),
    }, os.path.join(HERE, "goldens.safetensors"))
    with open(os.path.join(HERE, "tricky_prompts.json"), "w", encoding="utf-8") as f:
        json.dump(TRICKY, f, ensure_ascii=False, indent=1)
    with open(os.path.join(OUT, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(PROMPTS) + "\n")
    # The check command's input: one square batch (the model's size), uint8 [N, H, W, 3].
    square = torch.from_numpy(np.stack([images[0]] * len(PROMPTS)))
    square[1] = 255 - square[1]
    square[2] = square[2].flip(0)
    save_file({"images": square.contiguous()}, os.path.join(OUT, "images.safetensors"))
    with torch.no_grad():
        sq_px = torch.stack([preprocess_val(Image.fromarray(im.numpy())) for im in square])
        sq_out = model(sq_px, tokens)
        sq_scores = torch.diagonal(sq_out["image_features"] @ sq_out["text_features"].T)
    with open(os.path.join(OUT, "expected_scores.json"), "w") as f:
        json.dump({"scores": sq_scores.tolist()}, f, indent=1)
    print("scores", scores.tolist(), "check-command scores", sq_scores.tolist())


if __name__ == "__main__":
    main()

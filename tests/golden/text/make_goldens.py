#!/usr/bin/env python3
"""Golden files for the prompt text encoders (issue 6): tiny T5 v1.1 and CLIP-L text models,
tiny tokenizers in the real file formats, their outputs through diffusers' own
`FluxPipeline.encode_prompt`, and a tiny dataset in the DanceGRPO reference `.pt` layout.

Reproduce (from the repository root; the venv comes from deploy/reference-venv.sh):

    $(deploy/reference-venv.sh) tests/golden/text/make_goldens.py

Pinned versions (asserted below): torch 2.11.0, transformers 5.24.0, diffusers 0.42.1,
tokenizers 0.23.3, sentencepiece 0.2.3, safetensors 0.8.0. Everything is seeded, but the
BPE and SentencePiece trainers break frequency ties in an unspecified order, so a re-run can
give slightly different tokenizer files (and so different goldens). The committed files are
the goldens; re-run only to change them, and commit everything it writes together.

What it writes under tests/golden/text/:
- model/           laid out like FLUX.1-dev: text_encoder/ (CLIPTextModel, one safetensors),
                   text_encoder_2/ (T5EncoderModel, two shards + index), tokenizer/ (CLIP
                   vocab.json + merges.txt, a BPE trained here), tokenizer_2/ (spiece.model
                   trained here with sentencepiece, and the tokenizer.json transformers derives).
- prompts.json     the golden prompts (long, Unicode, empty, empty-after-cleaning).
- encoded.safetensors  t5_ids [N,512] i64, clip_ids [N,77] i64, prompt_embeds [N,512,32] f32,
                   pooled_prompt_embeds [N,32] f32, all from FluxPipeline.encode_prompt in f32.
- ref_layout/      videos2caption.json + prompt_embed/, pooled_prompt_embeds/, text_ids/ `.pt`
                   files written with torch.save exactly as DanceGRPO's preprocess does (bf16,
                   one item saved as a view into a batch so the storage has an offset).
- ref_layout_expected.safetensors  the same tensors, for the Rust reader to compare against.
"""

import json
import os
import random
import shutil
import tempfile

import diffusers
import safetensors
import sentencepiece as spm
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

assert torch.__version__.startswith("2.11.0"), torch.__version__
assert transformers.__version__ == "5.24.0", transformers.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert tokenizers.__version__ == "0.23.3", tokenizers.__version__
assert spm.__version__ == "0.2.3", spm.__version__
assert safetensors.__version__ == "0.8.0", safetensors.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "model")
T5_LEN = 512
CLIP_LEN = 77

WORDS = (
    "a photo of an astronaut riding horse on the moon highly detailed portrait woman man cat dog "
    "sunset over mountains lake forest city street at night neon lights painting oil canvas "
    "watercolor sketch digital art cinematic lighting close up wide angle lens bokeh golden hour "
    "futuristic castle dragon flying above clouds red blue green yellow purple orange black white "
    "small large old young happy sad beautiful dark bright soft sharp fantasy realistic 4k 8k "
    "trending artstation unreal engine octane render by greg rutkowski and alphonse mucha"
).split()
UNICODE = "café crème brûlée naïve façade Ünïcödé ＡＢＣ１２３ ß Σίσυφος ﬁne 🚀 ✨ 東京タワー".split()


def corpus(rng, n):
    lines = []
    for _ in range(n):
        k = rng.randint(3, 14)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.2:
            words.insert(rng.randint(0, k), rng.choice(UNICODE))
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", ",", "!", "?", ", 2024"])
        lines.append(line)
    return lines


def prompts():
    long = ", ".join(
        f"{w} number {i} with intricate ornaments" for i, w in enumerate(WORDS * 2)
    )
    return [
        "A photo of an astronaut riding a horse on the moon, highly detailed.",
        long,
        "Café crème brûlée — naïve façade, ＡＢＣ１２３ at night 東京タワー 🚀✨ Σίσυφος",
        "",
        "  \t\u3000  \n ",
    ]


def make_t5_tokenizer(rng, tmp):
    """A real-format SentencePiece unigram model (T5's ids: pad 0, eos 1, unk 2, nmt_nfkc)."""
    text = os.path.join(tmp, "corpus.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus(rng, 3000)) + "\n")
    prefix = os.path.join(tmp, "spiece")
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=prefix, model_type="unigram", vocab_size=250,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        character_coverage=1.0, seed_sentencepiece_size=100000, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2,
    )
    out = os.path.join(MODEL, "tokenizer_2")
    os.makedirs(out, exist_ok=True)
    shutil.copy(prefix + ".model", os.path.join(out, "spiece.model"))
    # transformers converts spiece.model to its tokenizers form; save that as tokenizer.json.
    tok = transformers.T5Tokenizer.from_pretrained(out, extra_ids=100)
    tok.save_pretrained(out)
    return transformers.T5TokenizerFast.from_pretrained(out)


def make_clip_tokenizer(rng):
    """vocab.json + merges.txt in CLIP's format: byte-level BPE with `</w>` word ends, the
    two specials last (as 49406/49407 are in the real file)."""
    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=700, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                         show_progress=False, min_frequency=2)
    tok.train_from_iterator(corpus(rng, 3000), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # Like the real vocab: every byte symbol alone and with `</w>`, then the merges in order.
    vocab = {}
    for ch in sorted(alphabet, key=lambda c: ord(c)):
        vocab[ch] = len(vocab)
    for ch in sorted(alphabet, key=lambda c: ord(c)):
        vocab[ch + "</w>"] = len(vocab)
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out = os.path.join(MODEL, "tokenizer")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({**specials, "model_max_length": CLIP_LEN, "do_lower_case": True,
                   "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    return transformers.CLIPTokenizer.from_pretrained(out)


def perturb_norms(model, gen):
    """Default init leaves norms at 1/0, which would not prove they load; shake them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def make_clip(vocab_size, gen):
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LEN, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=32,
        # FLUX.1-dev's text_encoder config keeps the legacy ids (eos 2): pooling by argmax.
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    model = transformers.CLIPTextModel(cfg).eval()
    perturb_norms(model, gen)
    out = os.path.join(MODEL, "text_encoder")
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    # transformers 5 saves CLIPTextModel keys without the `text_model.` prefix; FLUX.1-dev's
    # file (saved by transformers 4) has it. Write it the FLUX way, and encode with the model
    # transformers loads back from that file.
    sd = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    loaded = transformers.CLIPTextModel.from_pretrained(out).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    return loaded


def make_t5(vocab_size, gen):
    cfg = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
    )
    model = transformers.T5EncoderModel(cfg).eval()
    perturb_norms(model, gen)
    out = os.path.join(MODEL, "text_encoder_2")
    os.makedirs(out, exist_ok=True)
    cfg.architectures = ["T5EncoderModel"]
    cfg.to_json_file(os.path.join(out, "config.json"))
    # Two shards + index, like FLUX.1-dev's text_encoder_2 (written by hand so the split is fixed).
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return model


def write_ref_layout(embeds, pooled, captions):
    """DanceGRPO's preprocess_flux_embedding.py layout, with its torch.save calls."""
    root = os.path.join(HERE, "ref_layout")
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("prompt_embed", "pooled_prompt_embeds", "text_ids"):
        os.makedirs(os.path.join(root, sub))
    embeds = embeds.to(torch.bfloat16)
    pooled = pooled.to(torch.bfloat16)
    text_ids = torch.zeros(T5_LEN, 3, dtype=torch.bfloat16)
    items, expected = [], {}
    for i, caption in enumerate(captions):
        name = f"{i}.pt"
        # Item 1 is saved as a view into the batch (storage offset != 0), as a batch > 1 would be.
        pe = embeds[:2].clone()[1] if i == 1 else embeds[i].clone()
        torch.save(pe, os.path.join(root, "prompt_embed", name))
        torch.save(pooled[i].clone(), os.path.join(root, "pooled_prompt_embeds", name))
        torch.save(text_ids[i].clone(), os.path.join(root, "text_ids", name))
        items.append({"prompt_embed_path": name, "text_ids": name,
                      "pooled_prompt_embeds_path": name, "caption": caption})
        expected[f"prompt_embed.{i}"] = embeds[i].clone()
        expected[f"pooled_prompt_embeds.{i}"] = pooled[i].clone()
        expected[f"text_ids.{i}"] = text_ids[i].clone()
    with open(os.path.join(root, "videos2caption.json"), "w") as f:
        json.dump(items, f, indent=4)
    save_file(expected, os.path.join(HERE, "ref_layout_expected.safetensors"))


def main():
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    shutil.rmtree(MODEL, ignore_errors=True)
    os.makedirs(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        t5_tok = make_t5_tokenizer(rng, tmp)
    clip_tok = make_clip_tokenizer(rng)
    clip = make_clip(len(clip_tok), gen)
    t5 = make_t5(((len(t5_tok) + 63) // 64) * 64, gen)

    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip,
        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=None,
    )
    ps = prompts()
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=ps, prompt_2=ps, device="cpu",
                                                       max_sequence_length=T5_LEN)
    assert embeds.shape == (len(ps), T5_LEN, 32) and pooled.shape == (len(ps), 32)
    assert text_ids.shape == (T5_LEN, 3) and not text_ids.any()
    t5_ids = t5_tok(ps, padding="max_length", max_length=T5_LEN, truncation=True,
                    return_tensors="pt").input_ids
    clip_ids = clip_tok(ps, padding="max_length", max_length=CLIP_LEN, truncation=True,
                        return_tensors="pt").input_ids
    # The slow path (spiece.model alone) must agree with tokenizer.json.
    only_spm = os.path.join(MODEL, "spm_only")
    os.makedirs(only_spm)
    shutil.copy(os.path.join(MODEL, "tokenizer_2", "spiece.model"), only_spm)
    spm_ids = transformers.T5Tokenizer.from_pretrained(only_spm)(
        ps, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt").input_ids
    shutil.rmtree(only_spm)
    assert torch.equal(spm_ids, t5_ids), "spiece.model and tokenizer.json disagree"
    assert (t5_ids[1] != 0).all(), "the long prompt must fill all 512 T5 tokens"
    assert (clip_ids[1, :-1] != clip_tok.pad_token_id).all(), "the long prompt must fill 77 CLIP tokens"

    with open(os.path.join(HERE, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(ps, f, ensure_ascii=False, indent=1)
    save_file({"t5_ids": t5_ids.contiguous(), "clip_ids": clip_ids.contiguous(),
               "prompt_embeds": embeds.float().contiguous(),
               "pooled_prompt_embeds": pooled.float().contiguous()},
              os.path.join(HERE, "encoded.safetensors"))
    write_ref_layout(embeds[:3], pooled[:3], ps[:3])
    print("t5 ids[0]:", t5_ids[0, :20].tolist())
    print("clip ids[2]:", clip_ids[2, :20].tolist())


if __name__ == "__main__":
    main()

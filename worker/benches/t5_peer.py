"""Python peer of benches/t5_encoder.rs: transformers' T5EncoderModel on the same mid-size
config. Writes the random weights + ids for the Rust side, then times its own forward.

Usage (the Rust bench calls it): python t5_peer.py OUT_DIR THREADS ITERS
Prints one JSON line: {"ms": median milliseconds per forward}.
Pinned: torch 2.11.0, transformers 5.24.0 (deploy/reference-venv.sh)."""

import json
import os
import statistics
import sys
import time

import torch
import transformers
from safetensors.torch import save_file

out, threads, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, num_heads=8, d_ff=1024,
                            num_layers=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
model = transformers.T5EncoderModel(cfg).eval()
os.makedirs(out, exist_ok=True)
cfg.to_json_file(os.path.join(out, "config.json"))
sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
save_file(sd, os.path.join(out, "model.safetensors"))
ids = torch.randint(0, 32128, (2, 512), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = model(ids)[0]
    save_file({"ids": ids, "out": ref.contiguous()}, os.path.join(out, "io.safetensors"))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        model(ids)
        times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"ms": statistics.median(times)}))

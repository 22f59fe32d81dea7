"""Python peer of benches/hps_forward.rs: times open_clip's CLIP (open-clip-torch 3.3.0) image +
text forward on the same config, batch and thread count, and prints one JSON line.

Run by the Rust bench; alone: python hps_forward_peer.py '<config json>' BATCH THREADS ITERS
"""
import json
import statistics
import sys
import time

import torch
import open_clip


def main():
    cfg = json.loads(sys.argv[1])
    batch, threads, iters = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                           quick_gelu=False, output_dict=True).eval()
    s = cfg["vision_cfg"]["image_size"]
    pixels = torch.randn(batch, 3, s, s)
    tokens = torch.randint(1, 49406, (batch, 77))
    tokens[:, 0] = 49406
    tokens[:, 20] = 49407
    tokens[:, 21:] = 0
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            t0 = time.perf_counter()
            img = model.encode_image(pixels, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            (img * txt).sum(-1).tolist()
            if i > 0:  # the first call warms up
                times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3, "torch": torch.__version__,
                      "open_clip": open_clip.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

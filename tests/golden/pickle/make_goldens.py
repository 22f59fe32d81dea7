"""Goldens for the `torch.save` reader (worker/src/pt.rs): the files real checkpoints are.

Run with the project venv's python (deploy/reference-venv.sh); torch's own `torch.save` writes
every file, and torch's own `torch.load` reads each back here before it is kept, so the Rust
reader is held to what torch itself reads.

Files written (a tiny module whose state dict has what real ones have: fp32, fp16 and bf16
parameters, int64 and bool buffers, a 0-dim tensor, tied weights sharing one storage, a
transposed buffer, a buffer that is a slice at a storage offset, and `_metadata`):
- state_dict.pt        torch.save(model.state_dict())           an OrderedDict, the zip format
- nested.pt            torch.save({'state_dict': sd, 'epoch': 3, 'step': [1, 2]})
- legacy.pt            torch.save(sd, _use_new_zipfile_serialization=False)
- legacy_nested.pt     the nested dict in the legacy format
- parameters.pt        torch.save(dict(model.named_parameters()))   nn.Parameter values
- expected.safetensors every tensor of sd, contiguous, for the comparison
- expected_keys.json   the keys of sd in the file's order, and the pairs that share storage
- bad/truncated.pt, bad/legacy_truncated.pt   the first half of state_dict.pt / legacy.pt
- bad/list_root.pt     a list at the root
"""
import collections
import json
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.proj = torch.nn.Linear(4, 5)
        self.norm = torch.nn.LayerNorm(5).half()
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight  # tied: one storage, two keys
        self.low = torch.nn.Linear(5, 3).to(torch.bfloat16)
        self.register_buffer("position_ids", torch.arange(6, dtype=torch.int64).unsqueeze(0))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("scale", torch.tensor(2.5))
        self.register_buffer("transposed", torch.randn(3, 4).t())
        self.register_buffer("window", torch.randn(10)[3:8])


def main():
    torch.manual_seed(0)
    model = Tiny()
    sd = model.state_dict()
    assert isinstance(sd, collections.OrderedDict) and hasattr(sd, "_metadata")
    nested = {"state_dict": sd, "epoch": 3, "step": [1, 2]}
    bad = os.path.join(HERE, "bad")
    os.makedirs(bad, exist_ok=True)
    files = {
        "state_dict.pt": (sd, {}),
        "nested.pt": (nested, {}),
        "legacy.pt": (sd, {"_use_new_zipfile_serialization": False}),
        "legacy_nested.pt": (nested, {"_use_new_zipfile_serialization": False}),
        "parameters.pt": (dict(model.named_parameters()), {}),
    }
    for name, (obj, kw) in files.items():
        path = os.path.join(HERE, name)
        torch.save(obj, path, **kw)
        back = torch.load(path, weights_only=True)
        back = back.get("state_dict", back)
        want = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        assert list(back) == list(want), name
        for k in want:
            assert back[k].dtype == want[k].dtype and torch.equal(back[k], want[k].detach()), k
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()},
              os.path.join(HERE, "expected.safetensors"))
    keys = {
        "state_dict": list(sd),
        "parameters": [k for k, _ in model.named_parameters()],
        "shared": [["embed.weight", "head.weight"]],
    }
    with open(os.path.join(HERE, "expected_keys.json"), "w") as f:
        json.dump(keys, f, indent=1)
    for src, dst in [("state_dict.pt", "truncated.pt"), ("legacy.pt", "legacy_truncated.pt")]:
        data = open(os.path.join(HERE, src), "rb").read()
        open(os.path.join(bad, dst), "wb").write(data[: len(data) // 2])
    torch.save([torch.zeros(2)], os.path.join(bad, "list_root.pt"))


if __name__ == "__main__":
    main()

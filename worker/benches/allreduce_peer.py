"""The Python peer of benches/allreduce.rs: torch.distributed Gloo all-reduce on the same sizes.

Run by the Rust bench (one process per rank, env RANK / WORLD_SIZE / MASTER_PORT), with the
project venv's torch (2.11.0). Rank 0 prints one JSON line per (dtype, MiB): the median seconds
of one all-reduce, each timed between barriers, exactly as the Rust side does.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"])
    spec = json.loads(sys.argv[1])  # [{"dtype": "f32", "mib": 1, "warmup": 2, "iters": 10}, ...]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    for case in spec:
        dtype = dtypes[case["dtype"]]
        n = case["mib"] * 1024 * 1024 // dtype.itemsize
        t = torch.zeros(n, dtype=dtype)
        for _ in range(case["warmup"]):
            dist.all_reduce(t)
        times = []
        for _ in range(case["iters"]):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        times.sort()
        if rank == 0:
            print(json.dumps({**case, "median_s": times[len(times) // 2]}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

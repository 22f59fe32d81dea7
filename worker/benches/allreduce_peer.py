"""The Python peer of benches/allreduce.rs: torch.distributed Gloo all-reduce on the same cases.

Run by the Rust bench (one process per rank, env RANK / WORLD_SIZE / MASTER_PORT), with the
project venv's torch (2.11.0). argv[1] lists the cases ("f32:1,f32:16,..."); each stdin line is
a case number, and rank 0 answers with the seconds of one all-reduce of it, timed between
barriers exactly as the Rust side does.
"""

import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    tensors = []
    for case in sys.argv[1].split(","):
        name, mib = case.split(":")
        dtype = dtypes[name]
        tensors.append(torch.zeros(int(mib) * 1024 * 1024 // dtype.itemsize, dtype=dtype))
    for line in sys.stdin:
        t = tensors[int(line)]
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        seconds = time.perf_counter() - t0
        if rank == 0:
            print(seconds, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The Python peer of benches/allreduce.rs: torch.distributed Gloo all-reduce, all-gather into a
flat tensor and reduce-scatter out of one, on the same cases.

Run by the Rust bench (one process per rank, env RANK / WORLD_SIZE / MASTER_PORT), with the
project venv's torch (2.11.0). argv[1] lists the cases ("all_reduce:f32:1,..."; the MiB are the
full buffer's); each stdin line is a case number, and rank 0 answers with the seconds of one
collective of it, timed between barriers exactly as the Rust side does.
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
    cases = []
    for case in sys.argv[1].split(","):
        op, name, mib = case.split(":")
        dtype = dtypes[name]
        part = int(mib) * 1024 * 1024 // dtype.itemsize // world
        cases.append((op, torch.zeros(part * world, dtype=dtype), torch.zeros(part, dtype=dtype)))
    for line in sys.stdin:
        op, full, part = cases[int(line)]
        dist.barrier()
        t0 = time.perf_counter()
        if op == "all_reduce":
            dist.all_reduce(full)
        elif op == "all_gather":
            dist.all_gather_into_tensor(full, part)
        else:
            dist.reduce_scatter_tensor(part, full)
        seconds = time.perf_counter() - t0
        if rank == 0:
            print(seconds, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Train the example GPT for a few steps with DistributedDataParallel and backend="almostlinear".

    torchrun --nproc-per-node 2 examples/ddp_train.py [--steps 5] [--method auto|exact|polynomial]

gloo on CPU, nccl on CUDA (one GPU per rank). The model is compiled with
`almostlinear.rewriter.distributed.compile_for_ddp`: the backend sees the whole graph (attention is never
cut by DDP's bucket splitting), decisions are agreed across ranks, and the rewritten graph is then split at
DDP's buckets for the inner compiler. Rank 0 prints the report.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from almostlinear.rewriter.distributed import assert_same_decisions, compile_for_ddp
from almostlinear.rewriter.options import INNER_COMPILERS, METHODS
from almostlinear.zoo import GPT, GPTConfig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument("--inner", choices=INNER_COMPILERS, default=None,
                        help="default: inductor on CUDA, aot_eager on CPU (Inductor's C++ build is slow on a CPU)")
    parser.add_argument("--min-seq-len", type=int, default=0, help="0: approximate even short sequences (demo)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        inner = args.inner or ("inductor" if cuda else "aot_eager")

        torch.manual_seed(0)  # DDP broadcasts rank 0's parameters anyway
        model = GPT(GPTConfig(block_size=args.seq_len, n_layer=2, n_head=2, n_embd=64)).to(device)
        compiled = compile_for_ddp(model, method=args.method, inner=inner, min_seq_len=args.min_seq_len)
        ddp = DDP(compiled, bucket_cap_mb=args.bucket_cap_mb)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)

        generator = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
        for step in range(args.steps):
            started = time.perf_counter()
            tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
            x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
            loss = ddp(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step}: loss {mean.item() / world:.4f} ({time.perf_counter() - started:.2f} s)", flush=True)

        backend = compiled.almostlinear_backend
        assert_same_decisions(backend)  # raises if any rank took a different decision
        if rank == 0:
            print(f"\n{world} ranks ({'nccl' if cuda else 'gloo'}, inner={inner}): decisions identical on every rank")
            for report in backend.reports:
                print()
                print(report)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Start N CPU ranks (gloo on 127.0.0.1, a free port), run one function in each, always shut them down.

Each rank runs `fn(rank, world, **kwargs)` in a fresh spawned interpreter with OMP_NUM_THREADS=1 and saves
what it returns with torch.save; the parent joins with a deadline and kills every rank that is still alive
on a timeout or on any failure, so no process outlives the test.
"""
from __future__ import annotations

import datetime
import importlib
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: str, kwargs: dict, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(rank, world, **kwargs)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(target: str, world: int = 2, timeout: float = 240.0, **kwargs) -> list:
    """Run `module:function` on `world` ranks; return the per-rank results (raise on failure or timeout)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="almostlinear-dist-") as outdir:
        env_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children from their start
        try:
            procs = [ctx.Process(target=_entry, args=(r, world, port, target, kwargs, outdir), daemon=True)
                     for r in range(world)]
            for p in procs:
                p.start()
        finally:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target}: ranks still running after {timeout:.0f} s")
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # one rank failed: the others would wait in a collective; stop them now
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
                if p.is_alive():
                    p.kill()
                p.join(5)
        errors = []
        for r, p in enumerate(procs):
            err = os.path.join(outdir, f"rank{r}.err")
            if os.path.exists(err):
                errors.append(f"rank {r}:\n{open(err).read()}")
            elif p.exitcode != 0:
                errors.append(f"rank {r}: exit code {p.exitcode}")
        if errors:
            raise RuntimeError(f"{target} failed:\n" + "\n".join(errors))
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]

"""Hugging Face Trainer under DDP: 2 gloo ranks on the CPU, started with torchrun (`_ddp_worker.py`)."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).absolute().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_ddp_two_ranks_agree_on_decisions_and_rechecks(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RESULT_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).with_name("_ddp_worker.py"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    r0, r1 = ranks
    assert r0["wrapped"] == "DistributedDataParallel"  # the Trainer (accelerate) wrapped the compiled model
    assert r0["sites"] == [["transformer.h.0.attn", "polynomial"]] and r1["sites"] == r0["sites"], ranks
    assert r0["signature"] == r1["signature"]
    assert r0["recheck_calls"] == r1["recheck_calls"] == [2, 4]  # re-checks at the same calls on both ranks
    assert len(r0["losses"]) == 4 and all(math.isfinite(x) for x in r0["losses"])
    assert r0["losses"] == r1["losses"]  # the Trainer logs the loss averaged over ranks

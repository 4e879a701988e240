"""Lightning: a LightningModule whose inner model is compiled in place, and Lightning's own compile route
(`trainer.fit(torch.compile(lit_module, backend=almostlinear.Backend(...)))`), with the report callback.

Both run in one fresh interpreter (`_lightning_worker.py`): importing lightning replaces `torch.compile` for the
whole process, which would change what every later test in this session calls.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).absolute().parents[2]
ROUTES = ("lightning_compile", "inner_model")  # the string route first: its callback sees every report of the process


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_lightning_worker.py")), *ROUTES],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out[r["route"]] = r
        elif line.startswith("IMPORTED "):
            out["imported"] = json.loads(line[len("IMPORTED "):])
    return out


def test_importing_almostlinear_integrations_imports_no_optional_library(results):
    assert results["imported"] == []  # lightning, transformers, accelerate: imported only by the callbacks


@pytest.mark.parametrize("route", ROUTES)
def test_lightning_compiled_model_equals_uncompiled_exact(results, route):
    r = results[route]
    assert len(r["losses"]) == 5 and all(math.isfinite(x) for x in r["losses"])
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(r["expected"]), rtol=1e-5, atol=1e-6)
    # sites found and rewritten (module paths are relative to the compiled module: model.transformer... under
    # Lightning's route, transformer... for the inner model)
    paths = sorted(p.split("transformer.", 1)[-1] for p, _, _ in r["sites"])
    assert paths == [f"h.{i}.attn" for i in range(r["layers"])], r
    assert all(method == "exact" and rewritten for _, method, rewritten in r["sites"]), r
    assert r["columns"] == ["attention_mask", "doc_id", "input_ids", "labels"]  # Lightning passes the batch as is
    # reports reachable: metrics logged through pl_module.log (every logger gets them), text printed at fit end
    n = r["layers"]
    assert r["metrics"]["almostlinear/sites"] == n and r["metrics"]["almostlinear/exact"] == n, r["metrics"]
    assert f"h.{n - 1}.attn" in r["printed"] and "compiled" in r["events"]

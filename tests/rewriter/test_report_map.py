"""The printed approximability map says when its numbers were taken: at compile (call 0), or re-measured by the
re-check of a later training call, with the heads a re-check switched to exact marked as such (issue 25, 5)."""
import re

import torch

import almostlinear
from almostlinear.integrations import ReportWatcher
from almostlinear.zoo.gpt import GPT, GPTConfig

T = 64
N_HEAD = 4


def _gpt(sharp=(0,)):
    """A GPT whose `sharp` heads have large logits (they stay exact under `auto`), the others diffuse."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, n_layer=2, n_head=N_HEAD, n_embd=64, dropout=0.0))
    factors = torch.tensor([8.0 if h in sharp else 0.3 for h in range(N_HEAD)]).view(N_HEAD, 1, 1)
    with torch.no_grad():
        for block in model.h:  # rows [0, 64) of c_attn are q, head h at rows [16 h, 16 (h + 1))
            block.attn.c_attn.weight[:64].view(N_HEAD, 64 // N_HEAD, 64).mul_(factors)
    return model


def _map_lines(text: str) -> tuple[str, dict[str, list[str]]]:
    """The map's title and, per site id, its head cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("approximability map"))
    cells = {}
    for line in lines[start + 3:]:
        if not line.startswith("  ") or line.startswith("  call"):
            break
        sid, _module, *heads = re.split(r"\s{2,}", line.strip())
        cells[sid] = heads
    return lines[start], cells


def test_map_after_a_recheck_shows_the_new_errors_the_switch_and_when():
    model = _gpt()
    backend = almostlinear.Backend(method="auto", budget=0.05, min_seq_len=0, inner="aot_eager", recheck_every=1,
                                   guard=False)  # the re-check, not the run-time guard, switches the grown head
    compiled = torch.compile(model, backend=backend)
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(0))
    compiled(x).sum().backward()  # call 1: compiles (heads 1-3 of each site approximated), then a re-check
    report = backend.reports[-1]
    assert report.sites[0].approximated_heads == [1, 2, 3], str(report)
    compile_errors = [h["sampled_error"] for h in report.sites[0].heads]

    with torch.no_grad():  # training made head 1 of the first layer sharp
        model.h[0].attn.c_attn.weight[16:32].mul_(40.0)
    compiled(x).sum().backward()  # call 2: its re-check switches that head to exact
    assert report.sites[0].approximated_heads == [2, 3], str(report)
    text = str(report)
    title, cells = _map_lines(text)
    assert "5 of 8 heads approximated" in title and "after the re-check at call 2" in title, title
    assert "at compile (call 0) except error@N" in title and "(exact@N): switched to exact at call N" in title
    first, second = cells["0"], cells["1"]
    # head 0: exact since the compile, never re-measured: its compile numbers, unmarked
    assert first[0].startswith(f"{compile_errors[0]:.2g}/") and "@" not in first[0] and "*" not in first[0]
    # head 1: re-measured at call 2 (over budget), switched to exact at call 2
    assert re.match(r"[\d.e+-]+@2/", first[1]) and first[1].endswith("(exact@2)") and "*" not in first[1], first
    assert report.sites[0].heads[1]["recheck_error"] > 0.05 and report.sites[0].heads[1]["switched_at"] == 2
    # heads 2, 3 and the second site's heads 1-3: re-measured at call 2, still approximated
    for cell in first[2:] + second[1:]:
        assert re.match(r"[\d.e+-]+@2/.*\*$", cell), cells
    assert "@" not in second[0]
    # the end-to-end gradient error is the re-check's, and says so
    assert report.grad_error_call == 2 and "at the re-check of call 2 (within budget" in text, text
    # what the training callbacks print at the end of training is this same map
    assert title in ReportWatcher(backend).text()


def test_map_at_compile_is_labelled_call_0_and_polynomial_rechecks_relabel_it():
    model = _gpt(sharp=())
    backend = almostlinear.Backend(method="polynomial", min_seq_len=0, inner="aot_eager", recheck_every=2)
    compiled = torch.compile(model, backend=backend)
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(0))
    compiled(x).sum().backward()  # call 1: no re-check yet
    report = backend.reports[-1]
    title, cells = _map_lines(str(report))
    assert title.endswith("effective keys, at compile (call 0)):"), title
    assert all("@" not in cell and cell.endswith("*") for heads in cells.values() for cell in heads), cells
    assert "gradient error" in str(report) and "at compile (call 0) (information" in str(report)

    with torch.no_grad():  # far beyond any budget: method="polynomial" measures and records, never switches
        model.h[0].attn.c_attn.weight[:64].mul_(20.0)
    compiled(x).sum().backward()  # call 2: re-check
    title, cells = _map_lines(str(report))
    assert "8 of 8 heads approximated" in title and "after the re-check at call 2" in title, title
    assert all(re.match(r"[\d.e+-]+@2/.*\*$", cell) for heads in cells.values() for cell in heads), cells
    assert "exact@" not in "".join(c for heads in cells.values() for c in heads)
    assert max(h["recheck_error"] for h in report.sites[0].heads) > 0.05
    assert "at the re-check of call 2 (information" in str(report)

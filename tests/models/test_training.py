"""The main job (examples/train_gpt.py): a small GPT trained with method="auto" follows the exact run's loss
curve, and the four-way run (exact, auto, polynomial, polynomial + exact window) prints finite losses and
per-site decisions."""
import math

from almostlinear.zoo import GPTConfig
from almostlinear.zoo.data import split, stdlib_text
from examples.train_gpt import main, train


def test_auto_training_follows_the_exact_loss_curve():
    data = stdlib_text(max_bytes=300_000)
    config = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)
    common = dict(steps=200, batch=4, seed=0, lr=3e-3, device="cpu", progress=False, inner="aot_eager")
    exact = train("exact", config, data, method="exact", **common)
    approx = train("almostlinear", config, data, method="auto", min_seq_len=0, recheck_every=50, **common)
    report = approx.backend.reports[-1]
    assert any(d == "polynomial" for d in approx.decisions[0]), str(report)  # it did approximate
    assert approx.heads[0] == [2, 2], approx.heads[0]  # every head, at initialisation
    assert exact.losses[-1] < 0.8 * exact.losses[0], "the model learns"
    assert abs(approx.final_loss() - exact.final_loss()) <= 0.02 * exact.final_loss(), (
        approx.final_loss(), exact.final_loss(), str(report))


def test_four_way_run_prints_losses_and_decisions(tmp_path, capsys):
    main(["--steps", "12", "--layers", "1", "--heads", "2", "--embd", "32", "--seq-len", "32", "--batch", "2",
          "--recheck-every", "5", "--out", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("exact", "auto", "polynomial", "window") and len(line.split()) >= 7}
    assert set(rows) == {"exact", "auto", "polynomial", "window"}, out
    assert "window 8" in out  # the window run's report: a quarter of the context
    for name, cells in rows.items():
        assert all(math.isfinite(float(c)) for c in cells[1:5]), (name, cells)  # tokens/s, compile, train, val
    assert rows["exact"][6] == "0" and rows["polynomial"][6] == rows["window"][6] == "2", out  # heads at the end
    assert "approximability map" in out and "auto's decisions over time" in out, out
    assert "distance to softmax" in out, out
    assert ("matplotlib is not installed" in out) or (tmp_path / "curves.png").exists(), out


def test_validation_text_is_held_out():
    data = stdlib_text(max_bytes=100_000)
    train_data, val_data = split(data)
    assert len(train_data) + len(val_data) == len(data) and len(val_data) == len(data) // 10

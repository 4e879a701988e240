"""A small GPT trained with method="auto" follows the exact run's loss curve."""
from almostlinear.zoo import GPTConfig
from examples.train_gpt import stdlib_text, train


def test_auto_training_follows_the_exact_loss_curve():
    data = stdlib_text(max_bytes=300_000)
    config = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)
    common = dict(steps=200, batch=4, seed=0, lr=3e-3, device="cpu", progress=False, inner="aot_eager")
    exact = train("exact", config, data, method="exact", **common)
    approx = train("almostlinear", config, data, method="auto", min_seq_len=0, recheck_every=50, **common)
    report = approx.backend.reports[-1]
    assert any(d == "polynomial" for d in approx.decisions[0]), str(report)  # it did approximate
    assert exact.losses[-1] < 0.8 * exact.losses[0], "the model learns"
    assert abs(approx.final_loss() - exact.final_loss()) <= 0.02 * exact.final_loss(), (
        approx.final_loss(), exact.final_loss(), str(report))

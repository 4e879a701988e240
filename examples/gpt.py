"""Moved to `almostlinear.zoo` (`almostlinear/zoo/gpt.py`); import it from there. This re-export remains only
until the last importers (tests/rewriter, tests/distributed) switch, and is then deleted."""
from almostlinear.zoo.gpt import GPT, GPTConfig, timed_step  # noqa: F401

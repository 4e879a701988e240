"""almostlinear: a torch.compile backend that finds softmax attention and replaces it with fused exact
attention or a low-rank polynomial approximation, within a measured gradient-error budget.

    torch.compile(model, backend="almostlinear")                    # registered by entry point
    torch.compile(model, backend=almostlinear.Backend(budget=0.02))  # keeps .reports
    print(almostlinear.explain(model, x))
"""
from .rewriter import Backend, Options, Report, Site, explain
from .rewriter import options
from .rewriter.backend import RECENT_REPORTS, almostlinear_backend
from .rewriter.distributed import DistributedBackend, assert_same_decisions, compile_for_ddp
from .sharding import context_parallel, gather_sequence, shard_lengths, shard_sequence

__version__ = "0.1.0"


def last_reports(n: int | None = None) -> list[Report]:
    """Reports of the most recent graphs compiled through `backend="almostlinear"` (newest last)."""
    reports = list(RECENT_REPORTS)
    return reports if n is None else reports[-n:]


__all__ = ["Backend", "Options", "Report", "Site", "explain", "options", "almostlinear_backend", "last_reports",
           "compile_for_ddp", "DistributedBackend", "assert_same_decisions", "context_parallel", "shard_sequence",
           "shard_lengths", "gather_sequence"]

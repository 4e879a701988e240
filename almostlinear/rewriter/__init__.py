"""The backend: options, policy, the prepare/apply pipeline, calibration, measurement, the budget search,
re-checks, reports, hand-off to the inner compiler (docs/architecture.md)."""
from .backend import RECENT_REPORTS, Backend, almostlinear_backend, transform
from .explainer import explain, merge_reports
from .options import Options
from .report import Report, Site

__all__ = ["Backend", "almostlinear_backend", "transform", "explain", "merge_reports", "Options", "Report", "Site", "RECENT_REPORTS"]

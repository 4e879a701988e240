"""The backend: options, planning, rewriting, reports, hand-off to the inner compiler."""
from .backend import RECENT_REPORTS, Backend, almostlinear_backend, transform
from .explain import explain
from .options import Options
from .report import Report, Site

__all__ = ["Backend", "almostlinear_backend", "transform", "explain", "Options", "Report", "Site", "RECENT_REPORTS"]

"""Command line: `python -m almostlinear inspect ...` (also the console script `almostlinear`).

    almostlinear inspect --model llama --layers 2 --seq-len 256 --method auto --out inspect_out/
    almostlinear inspect --factory mypkg.models:make --method exact
    almostlinear inspect --factory path/to/models.py:make

A factory is `module:function` or `file.py:function` returning (model, args) or (model, args, kwargs). A module
is imported from the current directory first, else from the installed packages.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

MODELS = ("gpt2", "bert", "llama", "mistral", "gpt")


def _parser() -> argparse.ArgumentParser:
    from .rewriter.options import INNER_COMPILERS, METHODS

    parser = argparse.ArgumentParser(prog="almostlinear", description="Inspect what almostlinear does to a model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect}")
    inspect = sub.add_parser("inspect", help="compile a model, print the report, optionally write graphs")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=MODELS, help="a model built from its config with random weights")
    source.add_argument("--factory", help="module:function or file.py:function returning (model, args[, kwargs])")
    inspect.add_argument("--impl", choices=("eager", "sdpa"), default="eager", help="HF attn_implementation")
    inspect.add_argument("--layers", type=_positive, default=2)
    inspect.add_argument("--seq-len", type=_positive, default=128)
    inspect.add_argument("--method", choices=METHODS, default="auto")
    inspect.add_argument("--inner", choices=INNER_COMPILERS, default="eager")
    inspect.add_argument("--budget", type=float, default=0.05)
    inspect.add_argument("--degree", type=int, default=None)
    inspect.add_argument("--min-seq-len", type=int, default=None)
    inspect.add_argument("--out", type=Path, help="folder for graph code, drawings and report.json")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _exec_module(spec):
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _import_file(path: str):
    """A factory's `.py` file, loaded by location (nothing is added to the import path)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise ImportError(f"no such file {str(file)!r}")
    free = file.stem.isidentifier() and file.stem not in sys.modules
    name = file.stem if free else f"_almostlinear_factory_{file.stem}"
    return _exec_module(importlib.util.spec_from_file_location(name, file))


def _import_module(name: str):
    """A dotted module, its top-level module or package taken from the current directory when it is there (as
    `python -m` would), else from the installed packages; the import path is left as it is. A folder without
    `__init__.py` counts only when nothing installed has its name (as a namespace package would)."""
    top = name.split(".", 1)[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
        if spec is not None and (spec.origin is not None or importlib.util.find_spec(top) is None):
            _exec_module(spec)
    return importlib.import_module(name)


def _load_factory(spec: str, parser: argparse.ArgumentParser):
    if ":" not in spec:
        parser.error(f"--factory must look like module:function or file.py:function, got {spec!r}")
    module_name, _, function_name = spec.rpartition(":")  # the last colon: a Windows path has one more
    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    try:
        module = _import_file(module_name) if is_file else _import_module(module_name)
    except ImportError as exc:
        parser.error(f"--factory: cannot import {module_name!r} ({exc}); install the module, run from the folder "
                     f"that holds it, or pass a file path such as path/to/models.py:{function_name}")
    function = getattr(module, function_name, None)
    if not callable(function):
        parser.error(f"--factory: {module_name!r} has no function {function_name!r}")
    made = function()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        parser.error("--factory must return (model, args) or (model, args, kwargs)")
    model, args, kwargs = (*made, {}) if len(made) == 2 else made
    return model, tuple(args), dict(kwargs)


def _build(ns, parser):
    import torch

    if ns.factory:
        return _load_factory(ns.factory, parser)
    if ns.model == "gpt":
        from .zoo import GPT, GPTConfig

        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=ns.seq_len, n_layer=ns.layers, n_head=4, n_embd=128))
        return model, (torch.randint(0, model.config.vocab_size, (1, ns.seq_len)),), {}
    from .zoo import build

    model, ids, kwargs = build(ns.model, ns.impl, layers=ns.layers, seq_len=ns.seq_len)
    return model, (ids,), kwargs


def _draw(code_name: str, gm_code: str, out: Path) -> str:
    (out / f"{code_name}.py").write_text(gm_code)
    return str(out / f"{code_name}.py")


def _drawings(reports, out: Path) -> list[str]:
    notes = []
    if importlib.util.find_spec("pydot") is None:
        return ["drawings skipped: install pydot and graphviz (`pip install pydot`, `apt install graphviz`) for SVGs"]
    import torch.fx as fx
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    for report in reports:
        for kind, gm in (("before", report._graph_module_before), ("after", report._graph_module_after)):
            if not isinstance(gm, fx.GraphModule):
                continue
            path = out / f"{report.graph_name}_{kind}.svg"
            try:
                FxGraphDrawer(gm, f"{report.graph_name}_{kind}").get_dot_graph().write_svg(str(path))
                notes.append(str(path))
            except Exception as exc:  # noqa: BLE001 - graphviz's `dot` may be missing
                notes.append(f"drawing {path.name} failed: {exc}")
    return notes


def _approximability(report, out: Path) -> list[str]:
    """approximability.csv (one row per site and query head) and, with matplotlib, a heatmap PNG of the sampled
    degree-2 error, sites (layers) x heads; approximated heads are marked."""
    mapped = [s for s in report.sites if s.heads]
    if not mapped:
        return ["approximability map: no site was calibrated (below min_seq_len? pass --min-seq-len 0 to map "
                "every head)"]
    lines = ["site,module,head,logit_std,logit_max,effective_keys,sampled_error,approximated"]
    lines += [f"{s.id},{s.module_path},{h['head']},{h['logit_std']:.6g},{h['logit_max']:.6g},"
              f"{h['effective_keys']:.6g},{h['sampled_error']:.6g},{int(h['approximated'])}" for s in mapped for h in s.heads]
    (out / "approximability.csv").write_text("\n".join(lines) + "\n")
    written = [str(out / "approximability.csv")]
    if importlib.util.find_spec("matplotlib") is None:
        return written + ["heatmap skipped: install matplotlib (`pip install matplotlib`)"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(s.heads) for s in mapped)
    errors = np.full((len(mapped), width), np.nan)
    for row, site in enumerate(mapped):
        for h in site.heads:
            errors[row, h["head"]] = np.log10(max(h["sampled_error"], 1e-6))
    fig, ax = plt.subplots(figsize=(1 + 0.5 * width, 1 + 0.4 * len(mapped)))
    image = ax.imshow(errors, cmap="viridis", aspect="auto")
    for row, site in enumerate(mapped):
        for h in site.heads:
            if h["approximated"]:
                ax.text(h["head"], row, "*", ha="center", va="center", color="white")
    ax.set_xlabel("head")
    ax.set_yticks(range(len(mapped)), [s.module_path or str(s.id) for s in mapped])
    fig.colorbar(image, label=f"log10 sampled degree-2 error (budget {report.budget:g}); * approximated")
    fig.tight_layout()
    fig.savefig(out / "approximability.png", dpi=120)
    plt.close(fig)
    return written + [str(out / "approximability.png")]


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.budget <= 0:
        parser.error(f"--budget must be > 0, got {ns.budget}")
    import torch

    from . import Backend
    from .rewriter.explainer import merge_reports, preserved_state

    model, args, kwargs = _build(ns, parser)
    try:
        backend = Backend(method=ns.method, inner=ns.inner, budget=ns.budget, degree=ns.degree,
                          min_seq_len=ns.min_seq_len)
    except ValueError as exc:
        parser.error(str(exc))
    backend.keep_graph_modules = True
    with preserved_state(model if isinstance(model, torch.nn.Module) else None):
        torch.compile(model, backend=backend)(*args, **kwargs)
    report = merge_reports(backend.reports, type(model).__name__)
    print(report)
    if ns.out:
        ns.out.mkdir(parents=True, exist_ok=True)
        written = []
        for r in backend.reports:
            written.append(_draw(f"{r.graph_name}_before", r.graph_before, ns.out))
            written.append(_draw(f"{r.graph_name}_after", r.graph_after, ns.out))
        (ns.out / "report.json").write_text(json.dumps(report.as_dict(), indent=2, default=str))
        written.append(str(ns.out / "report.json"))
        written += _drawings(backend.reports, ns.out)
        written += _approximability(report, ns.out)
        print("\nwritten:\n  " + "\n  ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

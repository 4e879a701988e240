"""`python -m almostlinear inspect`: builds a model, prints the report, writes graphs and JSON."""
import json
import subprocess
import sys

import pytest

from almostlinear.__main__ import main


@pytest.mark.parametrize("model", ["gpt2", "bert", "llama"])
def test_inspect_hf_models(model, tmp_path, capsys):
    assert main(["inspect", "--model", model, "--seq-len", "16", "--method", "exact", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attention site(s)" in out and "exact" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["sites"]) == 2
    assert (tmp_path / "graph_0_before.py").exists() or any(tmp_path.glob("graph_*_before.py"))
    after = next(tmp_path.glob("graph_*_after.py")).read_text()
    assert "scaled_dot_product_attention" in after


def test_inspect_factory(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    def attention(q, k, v):\n"
        "        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v\n"
        "    q = torch.randn(1, 2, 8, 4)\n"
        "    return attention, (q, q, q)\n"
    )
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert main(["inspect", "--factory", "my_models:make"]) == 0
    assert "1 attention site(s)" in capsys.readouterr().out
    assert sys.path == path_before  # the module came from the current directory, the import path is untouched


def test_inspect_factory_file_path(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "file_models.py").write_text(
        "import dataclasses\n"
        "import torch\n"
        "@dataclasses.dataclass\n"  # needs its module registered while the file runs
        "class Shape:\n"
        "    n: int = 8\n"
        "def make():\n"
        "    def attention(q, k, v):\n"
        "        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v\n"
        "    q = torch.randn(1, 2, Shape().n, 4)\n"
        "    return attention, (q, q, q)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "file_models", raising=False)
    path_before = list(sys.path)
    assert main(["inspect", "--factory", "elsewhere/file_models.py:make"]) == 0
    assert "1 attention site(s)" in capsys.readouterr().out
    assert sys.path == path_before


@pytest.mark.parametrize("factory", ["no_such_module_xyz:make", "missing/models.py:make"])
def test_factory_that_cannot_be_imported_says_what_to_do(factory, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--factory", factory])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert repr(factory.rpartition(":")[0]) in err and "install the module" in err and "file path" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["inspect", "--model", "t5"], "choose from 'gpt2', 'bert', 'llama', 'mistral', 'gpt'"),
        (["inspect", "--model", "gpt2", "--method", "fast"], "choose from 'auto', 'exact', 'polynomial'"),
        (["inspect", "--model", "gpt2", "--budget", "-1"], "--budget must be > 0"),
        (["inspect", "--factory", "nocolon"], "module:function"),
        (["inspect", "--model", "gpt2", "--degree", "3"], "degree must be None"),
    ],
)
def test_usage_errors_name_the_valid_choices(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "almostlinear", "inspect", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--factory" in result.stdout


def test_inspect_writes_the_approximability_map(tmp_path, capsys):
    """--min-seq-len 0 calibrates every site: the map is printed and written per site and head."""
    assert main(["inspect", "--model", "gpt", "--layers", "2", "--seq-len", "32", "--min-seq-len", "0",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "approximability map" in printed
    rows = (tmp_path / "approximability.csv").read_text().splitlines()
    assert rows[0] == "site,module,head,logit_std,logit_max,effective_keys,sampled_error,approximated"
    assert len(rows) == 1 + 2 * 4  # 2 layers x 4 heads
    for row in rows[1:]:
        fields = row.split(",")
        assert float(fields[6]) >= 0 and fields[7] in ("0", "1") and 1 <= float(fields[5]) <= 32

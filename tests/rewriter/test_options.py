import pytest
import torch

import almostlinear
from almostlinear.rewriter.options import INNER_COMPILERS, METHODS, Options


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"budgett": 0.1}, "valid options are"),
        ({"method": "fast"}, str(list(METHODS))),
        ({"inner": "tvm"}, str(list(INNER_COMPILERS))),
        ({"budget": 0}, "budget must be a number > 0"),
        ({"budget": -1.0}, "budget must be a number > 0"),
        ({"budget": "0.1"}, "budget must be a number > 0"),
        ({"budget": True}, "budget must be a number > 0"),
        ({"degree": 3}, "[2, 4, 6]"),
        ({"min_seq_len": -5}, "min_seq_len must be None or an int >= 0"),
        ({"sites": {"h.0.*": "approx"}}, "['exact', 'polynomial', 'skip']"),
        ({"sites": ["h.0.*"]}, "sites must be a dict"),
        ({"recheck_every": 1.5}, "recheck_every must be an int >= 0"),
        ({"strict": "yes"}, "strict must be True or False"),
    ],
)
def test_invalid_option_names_valid_choices(bad, needle):
    with pytest.raises(ValueError) as info:
        almostlinear.Backend(**bad)
    assert needle in str(info.value)
    bad_value = next(iter(bad.values()))
    shown = repr(next(iter(bad_value.values()))) if isinstance(bad_value, dict) else repr(bad_value)
    assert shown in str(info.value) or "valid options" in str(info.value)


def test_unknown_key_lists_every_valid_key():
    with pytest.raises(ValueError) as info:
        Options.from_mapping({"budgett": 0.1})
    for key in ("budget", "method", "inner", "degree", "min_seq_len", "sites", "recheck_every", "strict"):
        assert key in str(info.value)


def test_options_are_validated_before_any_work_through_torch_compile():
    calls = []

    def fn(x):
        calls.append(1)
        return x.softmax(-1)

    compiled = torch.compile(fn, backend="almostlinear", options={"method": "nope"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 3))
    assert "method must be one of ['auto', 'exact', 'polynomial']" in str(info.value)


def test_defaults():
    options = Options.from_mapping(None)
    assert (options.budget, options.method, options.inner) == (0.05, "auto", "inductor")

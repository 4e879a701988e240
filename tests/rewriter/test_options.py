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
        ({"budget": 0}, "budget must be a finite number > 0"),
        ({"budget": -1.0}, "budget must be a finite number > 0"),
        ({"budget": "0.1"}, "budget must be a finite number > 0"),
        ({"budget": True}, "budget must be a finite number > 0"),
        ({"degree": 3}, "[2, 4, 6]"),
        ({"min_seq_len": -5}, "min_seq_len must be None or an int >= 0"),
        ({"sites": {"h.0.*": "approx"}}, "['exact', 'polynomial', 'skip']"),
        ({"sites": ["h.0.*"]}, "sites must be a dict"),
        ({"recheck_every": 1.5}, "recheck_every must be an int >= 0"),
        ({"strict": "yes"}, "strict must be True or False"),
        ({"guard": "on"}, "guard must be True or False"),
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
    for key in ("budget", "method", "inner", "degree", "min_seq_len", "sites", "recheck_every", "guard", "strict"):
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


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"budget": float("inf")}, "budget must be a finite number > 0"),
        ({"budget": float("-inf")}, "budget must be a finite number > 0"),
        ({"budget": float("nan")}, "budget must be a finite number > 0"),
        ({"budget": 1e400}, "valid range: 0 < budget < inf"),
        ({"degree": 2.0}, "one of the ints [2, 4, 6]"),
        ({"degree": True}, "one of the ints [2, 4, 6]"),
        ({"degree": False}, "one of the ints [2, 4, 6]"),
        ({"degree": "2"}, "one of the ints [2, 4, 6]"),
        ({"min_seq_len": 2.0}, "min_seq_len must be None or an int >= 0"),
        ({"min_seq_len": True}, "min_seq_len must be None or an int >= 0"),
        ({"recheck_every": 2.0}, "recheck_every must be an int >= 0"),
        ({"recheck_every": True}, "recheck_every must be an int >= 0"),
        ({"recheck_every": -1}, "recheck_every must be an int >= 0"),
        ({"strict": 0}, "strict must be True or False"),
        ({"strict": 1}, "strict must be True or False"),
        ({"strict": None}, "strict must be True or False"),
        ({"method": None}, "method must be one of"),
        ({"method": ["auto"]}, "method must be one of"),
        ({"inner": None}, "inner must be one of"),
        ({"sites": {"h.*": None}}, "must be one of ['exact', 'polynomial', 'skip']"),
        ({"sites": {3: "exact"}}, "sites keys must be module-path globs (str), got 3"),
        ({"sites": "h.*"}, "sites must be a dict"),
    ],
)
def test_invalid_values_of_every_field_are_rejected_with_the_value(bad, needle):
    (name, value), = bad.items()
    with pytest.raises(ValueError) as info:
        almostlinear.Backend(**bad)
    message = str(info.value)
    assert needle in message
    if isinstance(value, dict):  # the offending entry: the value, or the key when the key is wrong
        key, choice = next(iter(value.items()))
        value = choice if isinstance(key, str) else key
    assert name.split("_")[0] in message and repr(value) in message, message


def test_numpy_scalars_are_validated_by_value_and_stored_as_python_numbers():
    np = pytest.importorskip("numpy")
    options = Options.from_mapping(budget=np.float32(0.25), degree=np.int64(4), min_seq_len=np.int32(7),
                                   recheck_every=np.uint8(3))
    assert (options.budget, options.degree, options.min_seq_len, options.recheck_every) == (0.25, 4, 7, 3)
    assert [type(v) for v in (options.budget, options.degree, options.min_seq_len, options.recheck_every)] == [
        float, int, int, int]
    for bad in ({"budget": np.float64("nan")}, {"budget": np.float32("inf")}, {"degree": np.float64(2.0)},
                {"min_seq_len": np.float64(8.0)}, {"recheck_every": np.float32(1.0)}, {"strict": np.True_},
                {"budget": np.True_}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Options.from_mapping(bad)


def test_sites_is_an_immutable_copy_of_the_callers_dict():
    sites = {"h.0.*": "exact"}
    backend = almostlinear.Backend(sites=sites)
    sites["h.0.*"] = "bogus"  # changing the caller's dict afterwards bypasses nothing
    sites["h.1.*"] = "polynomial"
    assert dict(backend.options.sites) == {"h.0.*": "exact"}
    assert list(backend.options.sites.items()) == [("h.0.*", "exact")]
    with pytest.raises(TypeError):
        backend.options.sites["h.2.*"] = "skip"
    as_dict = backend.options.as_dict()
    assert type(as_dict["sites"]) is dict and as_dict["sites"] == {"h.0.*": "exact"}
    as_dict["sites"]["x"] = "skip"  # a fresh dict: the options do not change
    assert "x" not in backend.options.sites
    assert backend.options == Options.from_mapping(sites={"h.0.*": "exact"})


def test_direct_construction_and_replace_are_validated_too():
    import dataclasses

    with pytest.raises(ValueError, match="budget must be a finite number > 0"):
        Options(budget=float("inf"))
    with pytest.raises(ValueError, match="degree must be None"):
        dataclasses.replace(Options(), degree=3.0)
    with pytest.raises(ValueError, match="options must be a dict"):
        Options.from_mapping([("budget", 0.1)])

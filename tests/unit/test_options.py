"""Every capture option validated once (streamtap.options): an unknown name suggests the close one, a bad
value names the option, exclusive options are refused together, and the environment is read in one place."""

from pathlib import Path

import pytest

import streamtap as st
from streamtap.errors import OptionError, StreamtapError
from streamtap.options import CaptureOptions, CorpusOptions, Settings


def _refused(cls, match, **kwargs):
    with pytest.raises(OptionError, match=match) as info:
        cls.from_kwargs(kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, StreamtapError)
    assert st.OptionError is OptionError
    return str(info.value)


@pytest.mark.parametrize("cls, typo, meant", [
    (CaptureOptions, "nuerons", "neurons"),
    (CaptureOptions, "store_dype", "store_dtype"),
    (CaptureOptions, "queue_deph", "queue_depth"),
    (CorpusOptions, "batchsize", "batch_size"),
    (CorpusOptions, "resum", "resume"),
])
def test_an_unknown_option_suggests_the_close_name(cls, typo, meant):
    message = _refused(cls, rf"unknown option '{typo}'; did you mean '{meant}'\?", **{typo: True})
    assert "Options: " in message and "neurons" in message


def test_an_unknown_option_with_nothing_close_lists_the_options():
    message = _refused(CaptureOptions, r"unknown option 'xyzzy' Options: neurons, patterns, append", xyzzy=1)
    assert "did you mean" not in message


def test_a_corpus_option_is_unknown_to_a_tap():
    _refused(CaptureOptions, "unknown option 'batch_size'", batch_size=4)


BOOLS = ["neurons", "append", "overwrite", "check", "progress", "break_lock", "direct_io"]


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_flag_takes_true_or_false_only(name, value):
    _refused(CaptureOptions, rf"option {name}={value!r}: expected True or False", **{name: value})


@pytest.mark.parametrize("name", ["truncate", "resume"])
def test_a_corpus_flag_takes_true_or_false_only(name):
    _refused(CorpusOptions, rf"option {name}='no': expected True or False", **{name: "no"})


@pytest.mark.parametrize("kwargs, match", [
    ({"compress": "zstd"}, r"option compress='zstd': expected True, False or None"),
    ({"writer": "process"}, r"option writer='process': expected one of auto, thread, inline"),
    ({"queue_depth": 0}, r"option queue_depth=0: must be at least 1"),
    ({"queue_depth": "2"}, r"option queue_depth='2': expected an integer"),
    ({"queue_depth": True}, r"option queue_depth=True: expected an integer"),
    ({"store_dtype": "int8"}, r"option store_dtype='int8': expected float16 or bfloat16"),
    ({"storage_options": [("endpoint_url", "x")]}, r"option storage_options: expected a dict"),
    ({"model_name": 3}, r"option model_name=3: expected a string"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_a_bad_value_names_the_option_and_what_it_takes(kwargs, match):
    _refused(CaptureOptions, match, **kwargs)
    _refused(CorpusOptions, match, **kwargs)  # a corpus capture validates a tap's options too


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, r"option batch_size=0: must be at least 1"),
    ({"batch_size": 2.0}, r"option batch_size=2.0: expected an integer"),
    ({"max_length": 0}, r"option max_length=0: must be a positive integer or None"),
    ({"max_length": True}, r"option max_length=True: must be a positive integer or None"),
    ({"max_length": 2.5}, r"option max_length=2.5: must be a positive integer or None"),
], ids=lambda v: f"{next(iter(v))}={next(iter(v.values()))!r}" if isinstance(v, dict) else None)
def test_a_bad_corpus_value_names_the_option(kwargs, match):
    _refused(CorpusOptions, match, **kwargs)


def test_good_values_pass_and_store_dtype_is_normalised():
    options = CorpusOptions.from_kwargs({"store_dtype": "torch.bfloat16", "writer": "thread", "queue_depth": 3,
                                         "batch_size": 2, "max_length": 16, "compress": None,
                                         "storage_options": {"endpoint_url": "http://x"}})
    assert options.store_dtype == "bfloat16" and options.queue_depth == 3 and options.max_length == 16
    assert options.tap_options() == CaptureOptions(store_dtype="bfloat16", writer="thread", queue_depth=3,
                                                   storage_options={"endpoint_url": "http://x"},
                                                   direct_io=options.direct_io)


@pytest.mark.parametrize("cls, kwargs, match", [
    (CaptureOptions, {"append": True, "overwrite": True}, "append=True and overwrite=True exclude each other"),
    (CorpusOptions, {"append": True, "overwrite": True}, "append=True and overwrite=True exclude each other"),
    (CorpusOptions, {"resume": True, "append": True}, "resume=True and append=True exclude each other"),
    (CorpusOptions, {"resume": True, "overwrite": True}, "resume=True and overwrite=True exclude each other"),
])
def test_options_that_exclude_each_other_are_refused_together(cls, kwargs, match):
    message = _refused(cls, match, **kwargs)
    assert "pick one" in message
    for name in kwargs:  # each alone is fine
        cls.from_kwargs({name: True})


def test_settings_read_the_cache_directory_from_the_environment_given():
    home = Path.home()
    assert Settings.from_environ({}).cache_dir == home / ".cache" / "streamtap"
    assert Settings.from_environ({"XDG_CACHE_HOME": "/xdg"}).cache_dir == Path("/xdg/streamtap")
    assert Settings.from_environ({"STREAMTAP_CACHE": "/models/st"}).cache_dir == Path("/models/st")
    # the explicit setting wins over XDG's; an empty one is no setting
    both = {"STREAMTAP_CACHE": "/models/st", "XDG_CACHE_HOME": "/xdg"}
    assert Settings.from_environ(both).cache_dir == Path("/models/st")
    assert Settings.from_environ({"STREAMTAP_CACHE": "", "XDG_CACHE_HOME": "/xdg"}).cache_dir == Path("/xdg/streamtap")
    assert Settings.from_environ({"STREAMTAP_CACHE": "~/st"}).cache_dir == home / "st"


@pytest.mark.parametrize("value, direct", [(None, True), ("1", True), ("yes", True), ("0", False),
                                           ("false", False), ("no", False), ("off", False), ("OFF", False)])
def test_settings_read_direct_io_from_the_environment_given(value, direct):
    env = {} if value is None else {"STREAMTAP_DIRECT_IO": value}
    assert Settings.from_environ(env).direct_io is direct


def test_option_advice_reads_as_python_and_as_the_flag_on_the_command_line():
    from streamtap.errors import command_line_wording, option_advice

    message = (f"pass {option_advice('truncate')} to cut it; then resume with {option_advice('resume')}, or pass "
               f"{option_advice('break_lock')}")
    assert message == ("pass truncate=True (--truncate) to cut it; then resume with resume=True (--resume), or pass "
                       "break_lock=True (--break-lock)")
    assert command_line_wording(message) == "pass --truncate to cut it; then resume with --resume, or pass --break-lock"
    # other mentions of a keyword are left as they are
    assert command_line_wording("options append=True and overwrite=True exclude each other") == \
        "options append=True and overwrite=True exclude each other"

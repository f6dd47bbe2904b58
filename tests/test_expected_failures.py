"""Every expected failure in the suite is strict and expects an AssertionError only."""
import glob
import importlib
import os

from conftest import ROOT


def xfail_marks(function):
    """The xfail marks on a test function and on each of its parametrized cases."""
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "xfail":
            yield mark
        if mark.name == "parametrize":
            for case in mark.args[1]:
                yield from (m for m in getattr(case, "marks", ()) if m.name == "xfail")


def test_every_xfail_is_strict_and_raises_assertion_error():
    checked = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        module = importlib.import_module(os.path.basename(path)[:-3])
        for name, function in vars(module).items():
            if name.startswith("test_") and callable(function):
                for mark in xfail_marks(function):
                    checked += 1
                    assert mark.kwargs.get("strict") is True, f"{module.__name__}.{name}: xfail without strict=True"
                    assert mark.kwargs.get("raises") is AssertionError, f"{module.__name__}.{name}: xfail without raises=AssertionError"
    assert checked > 0, "no xfail found: is this test still looking in the right place?"

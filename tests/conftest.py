"""Shared test fixtures. The slow groups (claims, claims_long, exercises) run only when asked
for with -m; a plain `pytest` runs the fast suite."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPTConfig  # noqa: E402 (the repository root is on the path from here on)

# The seed of the trained cpu model that the claims check: 0 in CI; another seed stands in for another machine
# (floating-point results differ across CPUs, so the same seed trains a different model elsewhere).
CLAIMS_SEED = int(os.environ.get("CLAIMS_SEED", "0"))

SLOW_GROUPS = {
    "claims": "the paper's claims on SmolLM2-135M and on the trained models (minutes)",
    "claims_long": "05's studies over seeds (hours on 2 cores; not run by CI)",
    "exercises": "checks of the exercises, run by a teacher on a student's copy",
}


def pytest_configure(config):
    for name, text in SLOW_GROUPS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if not config.option.markexpr:
        config.option.markexpr = " and ".join(f"not {name}" for name in SLOW_GROUPS)


# The numbered scripts, each run once per session on the tiny profile by the fixture `quick`.
SCRIPT_NAMES = ["01_variance", "02_super_neurons", "03_dimension_disparity", "04_interventions", "05_pretrain_headwise"]


def load_script(filename):
    """Import a numbered script (its name starts with a digit, so `import` can't)."""
    path = os.path.join(ROOT, filename)
    spec = importlib.util.spec_from_file_location(filename[:-3].replace("0", "s0", 1), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers_in(value):
    """Every int or float inside nested dicts and lists (to check that metrics are finite)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return [value] if isinstance(value, (int, float)) else []


def claim_not_held(measured):
    """Mark a claim the model does not show: an expected failure with the measured number as
    its reason, strict (a pass is reported as an error, XPASS(strict)) and only by an
    AssertionError, so a crash in a fixture is never counted as the expected shortfall."""
    return pytest.mark.xfail(reason=measured, strict=True, raises=AssertionError)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    """The five scripts through main(["--quick"]), once per session, sharing one out dir: the tiny model
    trains once (05 finds it in the cache and trains its other three variants) -> (out dir, {script: the
    metrics its main returned})."""
    out = tmp_path_factory.mktemp("quick")
    return out, {name: load_script(f"{name}.py").main(["--quick", "--out_dir", str(out)]) for name in SCRIPT_NAMES}


@pytest.fixture
def tiny_config():
    return GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)

"""Checks of the exercises in 03_dimension_disparity.py and 04_interventions.py that have a
definite, measurable answer, on the cpu profile (the model cached in out/checkpoints).
A check of code the student has to write skips until that code exists."""
import os

import pytest

from conftest import ROOT, load_script
from model import profile_configs

pytestmark = pytest.mark.exercises
OUT = os.path.join(ROOT, "out")


def run(filename, *flags):
    return load_script(filename).main(["--profile", "cpu", "--out_dir", OUT, *flags])


def require(filename, text):
    """Skip until the student's code (a flag or function named `text`) is in the script."""
    if text not in open(os.path.join(ROOT, filename)).read():
        pytest.skip("not implemented yet")


def test_03_exercise_1_dominance_ratio_is_at_most_n_embd():
    n_embd = profile_configs("cpu")[0].n_embd
    metrics = run("03_dimension_disparity.py")
    assert max(metrics["dominance_ratio_token0_by_layer"]) <= n_embd  # reached only by a one-hot vector


def test_03_exercise_2_on_bos_windows_token0_has_one_direction():
    require("03_dimension_disparity.py", "--direction_on_bos")
    metrics = run("03_dimension_disparity.py", "--direction_on_bos")
    assert all(c == pytest.approx(1, abs=1e-4) for c in metrics["token0_direction_cosine_by_layer"])


def test_04_exercise_1_lambda_one_is_the_baseline():
    metrics = run("04_interventions.py")
    k = metrics["k"]
    for key in ("attention_to_k_variance", "attention_to_k_norm_control"):
        assert metrics[key][0] == pytest.approx(metrics["attention_received_baseline"][k], abs=1e-5)


def test_04_exercise_2_with_k_20_the_sink_is_at_20():
    metrics = run("04_interventions.py", "--k", "20")
    received = metrics["attention_received_masked"]
    assert metrics["k"] == 20
    assert max(range(1, len(received)), key=received.__getitem__) == 20
    assert metrics["sink_moved_to_k"]


def test_04_exercise_4_mean_ablation_of_the_super_neuron_weakens_the_sink():
    require("04_interventions.py", "--mean_ablate")
    before = run("04_interventions.py")["attention_received_baseline"][0]
    after = run("04_interventions.py", "--mean_ablate")["attention_received_baseline"][0]
    assert after < before

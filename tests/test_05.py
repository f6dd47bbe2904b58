"""Tests of 05_pretrain_headwise.py: what its --quick metrics hold, its own functions on inputs with known
answers, and (group `claims_long`: not run by CI) the convergence claim over 5 seeds on the cpu profile:
python -m pytest -m claims_long tests/test_05.py (what every script writes: test_scripts.py; the shared
measures: test_measures.py; sink removal over seeds: test_claims.py)"""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, claim_not_held, load_script
from data import ByteData
from measures import dominance_ratio, variance_by_position
from model import GPT, InputError
from training import checkpoint_path

pretrain = load_script("05_pretrain_headwise.py")

VARIANTS = ["softmax", "sigmoid", "headwise", "gated"]


# ----------------------------------------------------------------------------- the script's --quick metrics

def test_the_sink_claims_name_gu_et_al_s_sink_rate(quick, capsys):
    pretrain.report(quick[1]["05_pretrain_headwise"], 32)
    assert "Gu et al.'s sink rate (a head with alpha > 0.3 in a window, per window)" in capsys.readouterr().out


def test_quick_curves_have_the_same_length_for_every_variant(quick):
    metrics = quick[1]["05_pretrain_headwise"]
    assert metrics["val_steps"] == [0, 20, 40, 60]  # the tiny profile's 60 steps, evaluated every 20
    assert list(metrics["val_loss_curves"]) == VARIANTS
    lengths = {len(curve) for by_seed in metrics["val_loss_curves"].values() for curve in by_seed.values()}
    assert lengths == {4}
    assert all(len(metrics["val_loss_final"][v]) == 1 for v in VARIANTS)


def test_quick_shapes(quick):
    metrics = quick[1]["05_pretrain_headwise"]
    n_layer, n_head, T = 2, 2, 32  # the tiny profile
    for v in VARIANTS:
        assert len(metrics["first_token_attention_by_layer"][v]) == n_layer
        assert len(metrics["dominance_ratio_token0_by_layer"][v]) == n_layer  # each block's input, after its RMSNorm
        assert len(metrics["effective_rank_by_layer"][v]) == n_layer + 1
        assert len(metrics["var_by_position"][v]) == T
    # one seed: the baseline's final loss is its own, which its falling curve first reaches at the last evaluation
    assert metrics["steps_to_baseline_loss"]["softmax"] == 60
    assert [len(layer) for layer in metrics["head_entropy"]] == [n_head] * n_layer
    assert [len(layer) for layer in metrics["head_output_variance"]] == [n_head] * n_layer


# ----------------------------------------------------------------------------- its command line

# 05 in each of 2 gloo processes under torchrun, `analyse` wrapped to record which rank calls it.
DRIVER = textwrap.dedent(f"""
    import importlib.util, os, sys
    sys.path.insert(0, {ROOT!r})
    import cli
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join({ROOT!r}, "05_pretrain_headwise.py"))
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    analyse = pretrain.analyse
    def recorded_analyse(model, x):
        open("analysed_by_rank" + os.environ["RANK"], "a").close()
        return analyse(model, x)
    pretrain.analyse = recorded_analyse
    cli.run_script(lambda: pretrain.main(sys.argv[1:]))
""")


def test_under_torchrun_rank_0_alone_estimates_analyses_and_prints(tmp_path):
    """Two variants, 10 steps, micro-batches of 4: each process's 8 windows of the batch of 16 in 2."""
    (tmp_path / "driver.py").write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "driver.py", "--quick",
               "--variants", "softmax,gated", "--steps", "10", "--micro_batch", "4", "--out_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    plan = "cpu, fp32, micro-batch 4 x 2 accumulation on each of 2 processes"
    for start in ("softmax: ", "gated: ", "tiny/softmax/seed 0: ", "tiny/gated/seed 0: "):  # the estimate, the trainings
        assert sum(line.startswith(start + plan) for line in lines) == 1, start
    assert sum(line.startswith("2 runs (tiny profile, 10 steps x 16 x 32 tokens each), 2 to train: ") for line in lines) == 1
    assert sum(line.lstrip().startswith("variant  final val loss") for line in lines) == 1
    assert sorted(p.name for p in tmp_path.glob("analysed_by_rank*")) == ["analysed_by_rank0"]
    assert (tmp_path / "out" / "05_pretrain_headwise" / "tiny-10steps" / "metrics.json").exists()


def test_unknown_variant_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="linear"):
        pretrain.main(["--quick", "--variants", "softmax,linear", "--out_dir", str(tmp_path)])


def test_variants_without_the_baseline_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="softmax"):
        pretrain.main(["--quick", "--variants", "headwise", "--out_dir", str(tmp_path)])


# ----------------------------------------------------------------------------- its own functions, known answers

def test_steps_to_reach():
    steps, losses = [0, 10, 20], [3.0, 2.0, 1.0]
    assert pretrain.steps_to_reach(steps, losses, 2.0) == 10  # reached exactly at an evaluation
    assert pretrain.steps_to_reach(steps, losses, 3.5) == 0
    assert pretrain.steps_to_reach(steps, losses, 0.5) is None


def test_seed_study_pairs_the_head_norm_arms_by_seed():
    """calibrated minus ones and decayed minus not decayed, seed by seed: a constant gap has no spread."""
    ones = {"0": [3.0, 2.0, 1.5], "1": [3.2, 2.4, 1.9], "2": [3.1, 2.1, 1.6]}
    shifted = lambda curves, d: {seed: [v + d for v in c] for seed, c in curves.items()}
    curves = {"softmax": ones, "headwise_ones": ones, "headwise_nodecay": shifted(ones, -0.1),
              "headwise": shifted(ones, -0.05)}
    study = pretrain.seed_study([0, 10, 20], curves, list(curves))
    calibrated, decayed = study["ablations"]["calibrated gain minus gain of ones"], study["ablations"]["gain decayed minus not decayed"]
    assert calibrated["final"] == pytest.approx({"mean": -0.1, "low": -0.1, "high": -0.1})
    assert decayed["mid"] == pytest.approx({"mean": 0.05, "low": 0.05, "high": 0.05})
    assert pretrain.seed_study([0, 10, 20], curves, ["softmax", "headwise"])["ablations"] == {}


def test_dominance_after_rmsnorm_and_variance_before_the_headwise_norm(tiny_config):
    """The paper measures dominance after RMSNorm (gain included), and Fig. 23 means something only before
    the head-wise norm: after it, every head vector has RMS 1 times its gain, by construction."""
    model = GPT(dataclasses.replace(tiny_config, attn="headwise"))
    with torch.no_grad():
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 2.0)  # a gain that is not 1, so its place shows
    x = torch.randint(256, (4, 16))
    _, cache = model.run_with_cache(x, record=["blocks.*.hook_resid_in", "blocks.0.attn.hook_head_out"])
    measured = pretrain.analyse(model, x)
    normalised = [model.blocks[i].attn_norm(cache[f"blocks.{i}.hook_resid_in"]).detach() for i in range(2)]
    expected = [float(dominance_ratio(n[:, 0]).mean()) for n in normalised]
    assert measured["dominance_ratio_token0"] == pytest.approx(expected, rel=1e-5)
    before = variance_by_position(cache["blocks.0.attn.hook_head_out"])[1].tolist()
    assert measured["var_by_position"] == pytest.approx(before, rel=1e-5)


def test_is_cached_sees_only_this_recipe(tmp_path):
    """A checkpoint of another recipe of the same profile, variant and seed is not this run's."""
    data = ByteData(b"cached or not " * 100, 32, "text")
    path, _ = checkpoint_path("tiny", "softmax", 0, data, "cpu", str(tmp_path))
    os.makedirs(os.path.dirname(path))
    open(path.replace(".pt", "0.pt"), "wb").close()  # same profile-attn-seed prefix, another key
    assert not pretrain.is_cached("tiny", "softmax", 0, data, "cpu", str(tmp_path))
    open(path, "wb").close()
    assert pretrain.is_cached("tiny", "softmax", 0, data, "cpu", str(tmp_path))


# ----------------------------------------------------------------------------- claims_long: 05's studies over seeds

OUT = os.path.join(ROOT, "out")  # shares the checkpoint cache with 01-04: seed 0 softmax is not trained again


@pytest.fixture(scope="module")
def seed_study():
    """The convergence claim on the cpu profile (no BOS: token 0's discrepancy is positional): 5 seeds, 2000 steps."""
    return pretrain.main(["--profile", "cpu", "--seeds", "5", "--steps", "2000", "--out_dir", OUT,
                          "--variants", "softmax,headwise,headwise_nodecay,headwise_ones"])


@pytest.mark.claims_long
def test_claim_headwise_ends_lower_paired_over_seeds(seed_study):
    """Held here with the calibrated, decayed gain: -0.038 nats [-0.070, -0.007] at step 2000 (5 seeds)."""
    d = seed_study["seed_study"]["by_variant"]["headwise"]["minus_baseline_final"]
    assert d["high"] < 0, f"head-wise minus baseline at the end: {d}"


@pytest.mark.claims_long
@claim_not_held("measured here (5 seeds, calibrated and decayed gain): -0.043 nats [-0.109, +0.023] at step 1000; "
                "without the decay -0.046 [-0.069, -0.023]")
def test_claim_headwise_converges_faster_paired_over_seeds(seed_study):
    d = seed_study["seed_study"]["by_variant"]["headwise"]["minus_baseline_mid"]
    assert d["high"] < 0, f"head-wise minus baseline at mid-training: {d}"

"""The paper's claims on a real pretrained model, SmolLM2-135M : the scripts 01-04 run
with --model smollm2-135m, and each claim is checked on their metrics with the field's thresholds
(Gu et al.'s epsilon = 0.3). Needs the extras of README's setup line; run with `pytest -m claims`."""
import os

import pytest

from conftest import ROOT, claim_not_held, load_script
from measures import SINK_LAYER_SHARE, SINK_THRESHOLD

pytestmark = pytest.mark.claims
OUT = os.path.join(ROOT, "out")
FIRST_SINK_LAYER = 3  # "a sink in most layers from layer 3 on"
FIG7_LAYERS = (0, 1)  # the paper's tau (0.32) is Llama-2's "layer 1": counted from 0 or from 1, both are checked


def run(filename):
    for package in ("gguf", "tokenizers", "safetensors"):
        pytest.importorskip(package)
    return load_script(filename).main(["--model", "smollm2-135m", "--out_dir", OUT])


@pytest.fixture(scope="module")
def smollm2_01():
    return run("01_variance.py")


@pytest.fixture(scope="module")
def smollm2_02():
    return run("02_super_neurons.py")


@pytest.fixture(scope="module")
def smollm2_03():
    return run("03_dimension_disparity.py")


@pytest.fixture(scope="module")
def smollm2_04():
    return run("04_interventions.py")


def test_a_sink_in_most_layers_from_layer_3_on(smollm2_01):
    """Gu et al.'s sink rate at least SINK_LAYER_SHARE (half the layer's heads and windows) in most layers from 3 on."""
    rate = smollm2_01["sink_rate_by_layer"]
    sinks = [r >= SINK_LAYER_SHARE for r in rate][FIRST_SINK_LAYER:]
    assert sum(sinks) > len(sinks) / 2, (
        f"{sum(sinks)} of {len(sinks)} layers from {FIRST_SINK_LAYER} on are sinks; Gu et al.'s sink rate by layer "
        f"{[round(r, 2) for r in rate]}")


def test_token0_variance_above_the_others_at_init(smollm2_01):
    assert smollm2_01["var_ratio_token0"]["init"] > 1, smollm2_01["var_ratio_token0"]


def test_token0_variance_above_the_others_on_random_tokens(smollm2_01):
    assert smollm2_01["var_ratio_token0"]["random_tokens"] > 1, smollm2_01["var_ratio_token0"]


def test_wo_weighs_token0s_high_variance_dimensions(smollm2_01):
    """Fig. 7 (left), the paper's reading: Kendall tau-b between the |W_O column| norms and the variance across
    windows of token 0's W_O-input dimensions is positive (Llama-2: 0.32; the sign is the claim) in the paper's
    layer 1. The within-token reading in the message, for comparison."""
    across, within = smollm2_01["wo_kendall_tau_across_windows_by_layer"], smollm2_01["wo_kendall_tau_by_layer"]
    assert all(across[i] > 0 for i in FIG7_LAYERS), (
        f"layers {FIG7_LAYERS}: tau across windows {[round(across[i], 3) for i in FIG7_LAYERS]}, "
        f"within token 0 {[round(within[i], 3) for i in FIG7_LAYERS]}")


@claim_not_held("SmolLM2 measured: Spearman rho +0.35 over the 9 heads of layer 3, the first sink layer; negative in "
                "10 of 30 layers (0, 2, 4, 6, 9, 10, 11, 14, 16, 25; -0.97 in layer 11, a layer without a sink)")
def test_low_entropy_heads_give_high_variance_outputs(smollm2_01):
    """Fig. 13: in the first sink layer (01's rule: Gu et al.'s sink rate >= SINK_LAYER_SHARE), Spearman's rho over the
    layer's heads between attention entropy and output variance is negative (the paper gives the sign: low-entropy
    heads give high-variance outputs)."""
    layer, rho = smollm2_01["sink_layer"], smollm2_01["head_entropy_variance_spearman_by_layer"]
    assert layer is not None, "no sink layer"
    assert rho[layer] < 0, f"layer {layer}: rho {rho[layer]:+.2f}; by layer {[round(r, 2) for r in rho]}"


def test_a_super_neuron_in_the_first_layers_writes_token0s_massive_dimensions(smollm2_02):
    """Found by W_gate and W_up row norms (z >= 3 in both), firing >= 10x on token 0, its W_down
    column's top dimensions among token 0's massive dimensions after that layer."""
    top = smollm2_02["top_super_neuron"]
    assert top["rule_met"], f"top unit by row norms: {top}"
    assert top["token0_activation_ratio"] >= 10, f"top unit's |activation| on token 0 over the others': {top}"
    assert smollm2_02["massive_dims_match"], (
        f"W_down top dims {smollm2_02['wdown_top_dims']} vs token 0's massive dims {smollm2_02['massive_dims']}")


@claim_not_held("SmolLM2 measured: token 0's cosine is 0.96-1.00 from the spike (layer 2) on, except 0.89 and 0.85 "
                "in layers 10 and 11, the two layers without a sink (others: 0.37-0.80)")
def test_token0_direction_after_rmsnorm_is_near_constant(smollm2_03):
    """From the first layer of token 0's norm spike on, the mean pairwise cosine of token 0's
    normalised state across windows is >= 0.9 (the others' for comparison in the message)."""
    after = smollm2_03["token0_direction_cosine_by_layer"][smollm2_03["spike_layer"]:]
    others = smollm2_03["others_direction_cosine_by_layer"][smollm2_03["spike_layer"]:]
    assert min(after) >= 0.9, f"from layer {smollm2_03['spike_layer']} on: token 0 {after}, others {others}"


def test_the_mask_moves_the_sink_to_k_as_the_paper_draws_it(smollm2_04):
    """Fig. 5: k becomes the peak of attention received (keys that at least 8 later queries see) and gets at
    least 10x its unmasked share (both bars ours; the paper draws the peak)."""
    k, peak = smollm2_04["k"], smollm2_04["mask_peak"]
    received, baseline = smollm2_04["attention_received_masked"][k], smollm2_04["attention_received_baseline"][k]
    assert smollm2_04["mask_peak_moved_to_k"], f"peak {peak}; k = {k} receives {received:.3f} masked, {baseline:.3f} unmasked"


@claim_not_held("SmolLM2 measured: the argmax over positions >= 1 moves to k = 10, which receives 0.279 averaged "
                "over layers 1-29 (0.010 without the mask; token 0: 0.531), just under 0.3")
def test_the_mask_moves_the_sink_to_k_by_gu_et_als_threshold(smollm2_04):
    k, received = smollm2_04["k"], smollm2_04["attention_received_masked"]
    argmax = max(range(1, len(received)), key=received.__getitem__)
    assert smollm2_04["sink_moved_to_k"], f"k = {k} receives {received[k]:.3f}; the argmax over positions >= 1 is {argmax}"


def test_variance_not_norm_moves_attention_to_k(smollm2_04):
    """The paper's control, in the main reading (the layers up to the token-0 unit's, mu over windows): at
    lambda = 32 the variance arm gives k at least 3x what either control at the same norm gives (3x: ours)."""
    variance, scale, shift = (smollm2_04[f"attention_to_k_{arm}"][-1] for arm in ("variance", "scale_control", "shift_control"))
    assert variance >= 3 * max(scale, shift), f"at lambda = 32: variance {variance:.3f}, scale {scale:.3f}, shift {shift:.3f}"


@claim_not_held("SmolLM2 measured (main reading, layers 0-1, mu over windows): attention to k rises from 0.010 at "
                "lambda = 1 to 0.141 at lambda = 32, under 0.3")
def test_variance_amplification_makes_a_sink_at_k(smollm2_04):
    """The paper: as lambda grows, attention to k grows, to a sink (Gu et al.'s 0.3)."""
    variance = smollm2_04["attention_to_k_variance"]
    assert variance[-1] > variance[0] and variance[-1] >= SINK_THRESHOLD, f"attention to k by lambda: {variance}"

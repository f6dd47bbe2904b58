"""Tests of 01_variance.py and 02_super_neurons.py: what their --quick metrics hold, and their own
functions on inputs with known answers (what every script writes: test_scripts.py; the shared measures:
test_measures.py; the paper's claims on the trained model: test_claims.py)."""
import math

import pytest
import torch

from conftest import load_script
from measures import first_sink_layer, variance_ratio_token0
from model import GPT

variance = load_script("01_variance.py")
super_neurons = load_script("02_super_neurons.py")


# ----------------------------------------------------------------------------- the scripts' --quick metrics

def test_quick_01_shapes(quick):
    metrics = quick[1]["01_variance"]
    T, n_layer, n_head = 32, 2, 2  # the tiny profile
    for case in ("init", "trained", "random_tokens"):
        assert set(metrics[f"var_by_position_{case}"]) == {"across_sequences", "within_token"}
        assert all(len(v) == T for v in metrics[f"var_by_position_{case}"].values())
        assert metrics[f"var_by_position_{case}"]["across_sequences"][0] > 0  # no BOS: token 0 varies across windows
    assert metrics["var_ratio_reading"] == "across_sequences"
    assert metrics["held_out_loss"] < math.log(257)  # the tiny model learnt something
    assert set(metrics["var_ratio_token0"]) == {"init", "trained", "random_tokens"}
    for key in ("first_token_attention_by_layer", "first_token_norm_by_layer", "other_token_norm_by_layer",
                "wo_kendall_tau_by_layer", "wo_kendall_tau_across_windows_by_layer", "wo_row_kendall_tau_mean_by_layer",
                "post_wo_var_ratio_by_layer",
                "head_entropy_variance_spearman_by_layer", "sink_rate_by_layer"):
        assert len(metrics[key]) == n_layer
    # every layer has the same (window, head) pairs: the rate over all layers is the mean of the layers' rates
    assert metrics["sink_rate"] == pytest.approx(sum(metrics["sink_rate_by_layer"]) / n_layer)
    assert metrics["sink_layer"] == first_sink_layer(metrics["sink_rate_by_layer"])  # the verdict is Gu et al.'s rate
    for key in ("head_entropy_by_layer", "head_output_variance_by_layer"):
        assert [len(heads) for heads in metrics[key]] == [n_head] * n_layer


def test_quick_02_shapes(quick):
    metrics = quick[1]["02_super_neurons"]
    top = metrics["top_super_neuron"]
    # the tiny model's 2 layers are both early: the top unit has the largest z sum of all, and is listed first
    assert metrics["super_neurons"][0] == top
    for s in metrics["super_neurons"]:
        assert s["rule_met"] or s == top  # only the top unit is listed without meeting the rule
        assert s["activation_argmax_unit"] == metrics["activation_argmax_unit_by_layer"][s["layer"]]
    assert len(metrics["massive_dims"]) == len(metrics["wdown_top_dims"]) == 3
    assert len(metrics["cosine_by_position"]) == 32
    # the recorded gate pre-activation over the norms of 02's FFN input and W_gate row: a cosine only if that
    # input is the one the model's FFN read
    assert all(-1 - 1e-5 <= c <= 1 + 1e-5 for c in metrics["cosine_by_position"])


# ----------------------------------------------------------------------------- their own functions, known answers

def test_kendall_tau_b_hand_cases():
    assert variance.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert variance.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    # ties: x has the tied pair (1, 2); 5 concordant, 0 discordant; tau-b = 5 / sqrt(5 * 6)
    assert variance.kendall_tau_b([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))


def test_wo_row_taus_one_per_output_row():
    wo_weight = torch.tensor([[1.0, -2.0, 3.0], [3.0, 2.0, 1.0]])  # (C_out, C_in); ranks by |weight|
    assert variance.wo_row_taus(wo_weight, [0.1, 0.2, 0.3]) == pytest.approx([1.0, -1.0])


def test_token0_variance_across_windows_in_wo_input_order():
    head_out = torch.zeros(3, 2, 5, 4)  # (N, H, T, hd)
    head_out[:, 1, 0, 2] = torch.tensor([1.0, 2.0, 3.0])  # head 1, token 0, dim 2: variance 1 over the 3 windows
    head_out[:, 0, 1] = torch.randn(3, 4)  # token 1 does not count
    assert variance.token0_variance_across_windows(head_out).tolist() == [0, 0, 0, 0, 0, 0, 1, 0]


def test_random_init_like_is_gpt_of_the_same_seed_in_the_models_dtype(tiny_config):
    """01's random-init copy: built in the studied model's dtype and device, and on the CPU in float32
    exactly the numbers GPT(config) draws from the same seed."""
    studied = GPT(tiny_config)
    torch.manual_seed(3)
    expected = GPT(tiny_config).state_dict()
    torch.manual_seed(3)
    built = variance.random_init_like(studied).state_dict()
    assert built.keys() == expected.keys() and all(torch.equal(built[k], expected[k]) for k in expected)
    in_bf16 = variance.random_init_like(GPT(tiny_config).to(torch.bfloat16))
    assert {t.dtype for t in in_bf16.state_dict().values()} | {b.dtype for b in in_bf16.buffers()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_variance_ratio_and_dimension_spread():
    assert variance_ratio_token0(torch.tensor([4.0, 1.0, 3.0])) == pytest.approx(2.0)
    head_out = torch.zeros(3, 2, 5, 4)  # (N, H, T, hd)
    head_out[:, 1, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # head 1, token 0: mean 0, squared deviation 1
    spread = variance.token0_dimension_spread(head_out)
    assert spread.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # W_O's input order: h * hd + d


def test_kurtosis_and_gate_cosine():
    one_hot = torch.nn.functional.one_hot(torch.tensor(0), 64).double()
    p = 1 / 64
    assert super_neurons.kurtosis(one_hot) == pytest.approx((1 - 6 * p * (1 - p)) / (p * (1 - p)) + 3)
    assert super_neurons.kurtosis(torch.tensor([1.0, -1.0] * 8)) == pytest.approx(1.0)
    row, inputs = torch.randn(8), torch.randn(2, 3, 8)
    cosine = super_neurons.gate_cosine(inputs @ row, inputs, row)
    torch.testing.assert_close(cosine, torch.nn.functional.cosine_similarity(inputs, row.expand_as(inputs), dim=-1))


def test_fig13_shows_the_first_sink_layer_else_the_most_attention_to_token0():
    metrics = {"sink_layer": 2, "first_token_attention_by_layer": [0.1, 0.9, 0.6]}
    assert variance.fig13_layer(metrics) == (2, "the first sink layer")
    metrics["sink_layer"] = None
    assert variance.fig13_layer(metrics) == (1, "no sink: most attention to token 0")


def test_sink_follows_spike_only_in_the_papers_order():
    assert variance.sink_follows_spike(spike=1, sink=1) and variance.sink_follows_spike(spike=1, sink=2)
    assert not variance.sink_follows_spike(spike=1, sink=0)  # a sink before the spike is not the paper's order
    assert not variance.sink_follows_spike(spike=1, sink=3)
    assert not variance.sink_follows_spike(spike=None, sink=0)

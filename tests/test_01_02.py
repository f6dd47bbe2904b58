"""Tests of 01_variance.py and 02_super_neurons.py: the scripts through main(["--quick"]),
their measures on inputs with known answers; the paper's claims on the
trained model are in test_claims.py."""
import json
import math

import pytest
import torch

from conftest import load_script, numbers_in
from measures import (attention_entropy_by_head, first_sink_layer, head_output_variance, rank_correlation,
                      row_norm_zscores, super_neuron_record, token0_activation_ratio, unit_most_active_on_token0,
                      unit_most_selective_for_token0, unit_with_largest_row_norms)
from model import GPT

variance = load_script("01_variance.py")
super_neurons = load_script("02_super_neurons.py")

KEYS = {
    "01_variance": ["var_by_position_init", "var_by_position_trained", "var_by_position_random_tokens",
                    "var_ratio_token0", "first_token_attention_by_layer", "first_token_norm_by_layer",
                    "other_token_norm_by_layer", "wo_kendall_tau_by_layer", "wo_kendall_tau_across_windows_by_layer",
                    "post_wo_var_ratio_by_layer", "head_entropy_variance_spearman_by_layer", "sink_rate_by_layer",
                    "sink_rate", "sink_layer"],
    "02_super_neurons": ["super_neurons", "top_super_neuron", "wdown_column_kurtosis", "massive_dims",
                         "massive_dims_match"],
}
RUN_KEYS = {"argv", "script", "seed", "subject", "device", "precision", "torch", "commit"}
SCRIPTS = {"01_variance": variance, "02_super_neurons": super_neurons}
N_FIGURES = {"01_variance": 4, "02_super_neurons": 3}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Both scripts on the tiny profile, sharing one out dir, so the tiny model trains once."""
    out = tmp_path_factory.mktemp("out")
    return out, {name: script.main(["--quick", "--out_dir", str(out)]) for name, script in SCRIPTS.items()}


# ----------------------------------------------------------------------------- the scripts, --quick

@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_every_key_figures_and_finite_numbers(quick, name):
    out, results = quick
    folder = out / name
    on_disk = json.loads((folder / "metrics.json").read_text())
    assert on_disk == results[name]
    assert set(KEYS[name]) <= set(on_disk), set(KEYS[name]) - set(on_disk)
    assert RUN_KEYS <= set(on_disk["run"]), RUN_KEYS - set(on_disk["run"])
    assert on_disk["run"]["argv"] == ["--quick", "--out_dir", str(out)] and on_disk["run"]["script"] == name
    assert on_disk["run"]["seed"] == 0 and on_disk["run"]["subject"] == "tiny model"
    assert all(math.isfinite(n) for n in numbers_in(on_disk))
    figures = list(folder.glob("*.png"))
    assert len(figures) == N_FIGURES[name] and all(f.stat().st_size > 0 for f in figures)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_seed_gives_identical_metrics(quick, name, tmp_path):
    """Trained again from scratch in an empty folder, not loaded from the first run's cache. The "run" entries
    differ: --out_dir is another folder."""
    _, results = quick
    again = SCRIPTS[name].main(["--quick", "--out_dir", str(tmp_path)])
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in results[name].items() if k != "run"}


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
    assert all(0 <= r <= 1 for r in metrics["sink_rate_by_layer"] + [metrics["sink_rate"]])
    assert metrics["sink_layer"] == first_sink_layer(metrics["sink_rate_by_layer"])  # the verdict is Gu et al.'s rate
    assert all(-1 <= t <= 1 for key in ("wo_kendall_tau_by_layer", "wo_kendall_tau_across_windows_by_layer",
                                        "wo_row_kendall_tau_mean_by_layer", "head_entropy_variance_spearman_by_layer")
               for t in metrics[key])
    for key in ("head_entropy_by_layer", "head_output_variance_by_layer"):
        assert [len(heads) for heads in metrics[key]] == [n_head] * n_layer
    assert all(0 < e <= math.log(T) for heads in metrics["head_entropy_by_layer"] for e in heads)


def test_quick_02_shapes(quick):
    metrics = quick[1]["02_super_neurons"]
    top, z = metrics["top_super_neuron"], metrics["super_z_threshold"]
    assert top in metrics["super_neurons"] and top["layer"] in (0, 1)  # the tiny model's early layers
    for s in metrics["super_neurons"]:
        assert s["rule_met"] == (s["gate_norm_z"] >= z and s["up_norm_z"] >= z)
        assert s["rule_met"] or s == top  # only the top unit is listed without meeting the rule
        assert s["activation_argmax_unit"] == metrics["activation_argmax_unit_by_layer"][s["layer"]]
    assert len(metrics["massive_dims"]) == 3 and isinstance(metrics["massive_dims_match"], bool)
    assert len(metrics["cosine_by_position"]) == 32
    assert all(-1 - 1e-5 <= c <= 1 + 1e-5 for c in metrics["cosine_by_position"])


# ----------------------------------------------------------------------------- measures, known answers

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


def test_head_entropy_and_output_variance_and_their_rank_correlation():
    """01's Fig. 13 measures on a hand-built layer: head 0 attends uniformly, head 1 only to token 0."""
    T = 4
    pattern = torch.zeros(1, 2, T, T)  # (B, H, T, T)
    pattern[0, 0] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).view(T, 1)
    pattern[0, 1, :, 0] = 1.0
    entropy = attention_entropy_by_head(pattern)
    expected = sum(math.log(t + 1) for t in range(1, T)) / (T - 1)  # rows t >= 1: uniform over t + 1 keys
    assert entropy.tolist() == pytest.approx([expected, 0.0])
    assert attention_entropy_by_head(0.25 * pattern).tolist() == pytest.approx([expected, 0.0])  # rows not summing to 1
    head_out = torch.zeros(2, 2, 3, 4)  # (B, H, T, hd)
    head_out[..., 0, :] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # each head's position 0: variance 4/3 over hd
    assert head_output_variance(head_out).tolist() == pytest.approx([4 / 9, 4 / 9])  # mean over the 3 positions
    assert rank_correlation([0.1, 0.5, 0.3], [3.0, 1.0, 2.0]) == pytest.approx(-1.0)
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)


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
    assert variance.variance_ratio_token0(torch.tensor([4.0, 1.0, 3.0])) == pytest.approx(2.0)
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


def test_token0_activation_ratio():
    hidden = torch.ones(2, 4, 3)
    hidden[:, 0, 1] = -20.0
    assert token0_activation_ratio(hidden, 1) == pytest.approx(20.0)
    assert token0_activation_ratio(hidden, 0) == pytest.approx(1.0)


def test_the_three_unit_pickers_find_three_planted_units():
    """By weights: the unit whose W_gate and W_up rows are longest; by activation: the unit largest on token 0,
    and the unit largest on token 0 against the other positions."""
    w_gate, w_up = torch.ones(6, 4), torch.ones(6, 4)  # (ffn, C)
    w_gate[1] *= 3
    w_up[1] *= 2
    w_gate[4] *= 2  # z(W_gate) only
    zs = row_norm_zscores(w_gate, w_up)
    assert unit_with_largest_row_norms({0: zs, 1: row_norm_zscores(torch.ones(6, 4), torch.ones(6, 4))}) == (0, 1)
    hidden = torch.ones(3, 5, 6)  # (N, T, ffn)
    hidden[:, :, 2] = 5.0  # large everywhere: the most active on token 0, not selective
    hidden[:, 0, 3] = -4.0  # 4x the others on token 0
    assert unit_most_active_on_token0(hidden) == 2
    assert unit_most_active_on_token0(hidden[:, :1]) == 2  # token 0 alone suffices
    assert unit_most_selective_for_token0({0: torch.ones(3, 5, 6), 1: hidden}) == (1, 3, pytest.approx(4.0))


def test_super_neuron_record():
    z_gate, z_up = torch.tensor([0.5, 3.5, -1.0]), torch.tensor([0.2, 3.0, 4.0])  # (ffn,)
    hidden = torch.ones(2, 4, 3)  # (N, T, ffn)
    hidden[:, 0, 1] = torch.tensor([6.0, 10.0])  # unit 1: the largest on token 0, 8x the others on average
    record = super_neuron_record(0, 1, z_gate, z_up, hidden)
    assert record == dict(layer=0, unit=1, gate_norm_z=3.5, up_norm_z=3.0, rule_met=True, token0_activation_ratio=8.0,
                          activation_token0=8.0, activation_argmax_unit=1, activation_argmax_agrees=True)
    other = super_neuron_record(0, 2, z_gate, z_up, hidden)
    assert not other["rule_met"] and other["activation_argmax_unit"] == 1 and not other["activation_argmax_agrees"]
    assert super_neuron_record(0, 2, z_gate, z_up, hidden, z_threshold=-1.0)["rule_met"]


def test_sink_follows_spike_only_in_the_papers_order():
    assert variance.sink_follows_spike(spike=1, sink=1) and variance.sink_follows_spike(spike=1, sink=2)
    assert not variance.sink_follows_spike(spike=1, sink=0)  # a sink before the spike is not the paper's order
    assert not variance.sink_follows_spike(spike=1, sink=3)
    assert not variance.sink_follows_spike(spike=None, sink=0)

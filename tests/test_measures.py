"""The shared measures on hand-built patterns and numbers with known answers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from data import BOS
from model import GPT, GPTConfig

from measures import (LINKS, attention_entropy_by_head, chain_links, crossings, has_sink, paper_order, removes_sink, attention_received, dominance_ratio, effective_rank, first_sink_layer,
                      head_attention_received, head_output_variance, interval_verdict, norm_spike_layer, paired_interval,
                      rank_correlation, row_norm_zscores, sink_rate, sink_scores, super_neuron_record,
                      token0_activation_ratio, unit_most_active_on_token0, unit_most_selective_for_token0,
                      unit_with_largest_row_norms)


def uniform_causal(T, B=1, H=1):
    """(B, H, T, T): each query spreads its weight evenly over the keys it can see."""
    causal = torch.tril(torch.ones(T, T))
    return (causal / causal.sum(-1, keepdim=True)).expand(B, H, T, T).clone()


def gu_sink_rate_by_hand(patterns, epsilon=0.3):
    """Gu et al.'s formula written out with loops: for every window n, layer and head h,
    alpha = (1/T) sum_i A[i, 0] / sum_j A[i, j]; a sink when alpha > epsilon; the rate is the mean
    of that indicator over windows, layers and heads."""
    indicators = []
    for pattern in patterns:
        B, H, T, _ = pattern.shape
        for n in range(B):
            for h in range(H):
                alpha = sum(float(pattern[n, h, i, 0] / pattern[n, h, i].abs().sum()) for i in range(T)) / T
                indicators.append(1.0 if alpha > epsilon else 0.0)
    return sum(indicators) / len(indicators)


def test_sink_rate_is_gu_et_al_s_formula_by_hand():
    """Every score here is exact in binary. The test fails if the comparison becomes >= (head 1 scores
    exactly 0.5 in window 0: checked at threshold 0.5), if the queries start at 1 instead of 0 (head 2's
    window-1 score falls under 0.3), or if windows are averaged before thresholding (head 2 is a sink
    in window 1 only, and its mean over windows, 0.23, is under 0.3)."""
    T = 8
    on_token0 = {(0, 1): [0.5] * 5 + [0.25] * 2,  # (head, window): weights of queries 1..7 on token 0
                 (1, 1): [0.75] * 4 + [0.5] * 2 + [1.0],
                 (0, 2): [0.0] * 7,
                 (1, 2): [0.25] * 7}
    windows = torch.zeros(2, 4, T, T)  # (B, H, T, T); query 0 sees only token 0
    windows[:, :, 0, 0] = 1.0
    windows[:, 0, 1:, 0] = 1.0  # head 0: every query on token 0, score 1
    windows[:, 3, 1:, 1] = 1.0  # head 3: every query on token 1, score 1/8
    for (n, h), weights in on_token0.items():
        windows[n, h, 1:, 0] = torch.tensor(weights)
        windows[n, h, 1:, 1] = 1 - torch.tensor(weights)  # the rest on token 1
    assert sink_scores(windows).tolist() == [[1.0, 0.5, 0.125, 0.125], [1.0, 0.75, 0.34375, 0.125]]
    sigmoid_like = 0.5 * windows  # rows summing to 0.5 are normalised first: the same sinks
    by_layer, overall = sink_rate([windows, sigmoid_like])
    assert by_layer == [5 / 8, 5 / 8] and overall == 5 / 8  # head 0 twice, head 1 twice, head 2 in window 1
    assert overall == gu_sink_rate_by_hand([windows, sigmoid_like])
    assert sink_rate([windows], threshold=0.5)[1] == 3 / 8 == gu_sink_rate_by_hand([windows], epsilon=0.5)


def test_a_previous_token_head_does_not_put_the_peak_on_the_last_positions():
    T, m = 16, 8
    pattern = uniform_causal(T, H=2)
    pattern[:, 1] = 0
    for t in range(T):  # head 1 looks at the previous token only (query 0 at itself)
        pattern[:, 1, t, max(t - 1, 0)] = 1.0
    raw = attention_received(pattern)  # key T-2 gets one query, which weighs it 1 in head 1
    assert int(raw[1:].argmax()) + 1 == T - 2
    kept = attention_received(pattern, min_later=m)
    assert (kept[T - m:] == 0).all() and kept[T - m - 1] > 0  # key j has T - 1 - j later queries
    assert int(kept[1:].argmax()) + 1 == T - 1 - m  # the last key counted: the previous-token head's key again
    assert head_attention_received(pattern, 3)[1] == pytest.approx(1 / (T - 4))  # only query 4 looks at 3


def test_norm_spike_layer_is_the_first_at_twice_the_others():
    assert norm_spike_layer([1, 1.9, 2.0, 5], [1, 1, 1, 1]) == 2
    assert norm_spike_layer([1, 1], [1, 1]) is None


def test_paired_interval_by_hand():
    mean, low, high = paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # d = 1, 2, 3: sd 1, t_{0.975, 2} = 4.303
    assert mean == 2.0 and low == pytest.approx(2 - 4.303 / math.sqrt(3)) and high == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert interval_verdict(low, high) == "not distinguishable at this budget"
    assert interval_verdict(*paired_interval([1.0, 1.1, 0.9], [2.0, 2.0, 2.0])[1:]) == "lower"
    assert paired_interval([3.0], [2.0]) == (1.0, None, None)
    assert interval_verdict(None, None) == "one seed: no interval"


def test_attention_entropy_of_uniform_and_one_hot_attention():
    """Head 0 spreads each query evenly over the keys it sees, head 1 puts every query on key 0 (a perfect sink);
    row 0, which sees only itself, is left out."""
    T = 6
    pattern = uniform_causal(T, B=3, H=2)
    pattern[:, 1] = 0
    pattern[:, 1, :, 0] = 1.0
    expected_uniform = sum(math.log(t + 1) for t in range(1, T)) / (T - 1)  # rows t >= 1: uniform over t + 1 keys
    assert_close(attention_entropy_by_head(pattern), torch.tensor([expected_uniform, 0.0]))
    assert_close(attention_entropy_by_head(0.25 * pattern), torch.tensor([expected_uniform, 0.0]))  # rows summing to 0.25


def test_head_output_variance_and_rank_correlation():
    head_out = torch.zeros(2, 2, 3, 4)  # (B, H, T, hd)
    head_out[..., 0, :] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # each head's position 0: variance 4/3 over hd
    assert head_output_variance(head_out).tolist() == pytest.approx([4 / 9, 4 / 9])  # mean over the 3 positions
    assert rank_correlation([0.1, 0.5, 0.3], [3.0, 1.0, 2.0]) == pytest.approx(-1.0)
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)


def test_attention_received_of_uniform_causal_attention():
    T = 6
    expected = torch.tensor([sum(1 / (t + 1) for t in range(j + 1, T)) / max(T - j - 1, 1) for j in range(T)])
    expected[-1] = 0.0  # no query after the last key
    assert_close(attention_received(uniform_causal(T, B=2, H=3)), expected)


def test_first_sink_layer_from_a_layer_on():
    rate = [1.0, 0.25, 0.5, 1.0]  # Gu et al.'s sink rate by layer
    assert first_sink_layer(rate) == 0
    assert first_sink_layer(rate, from_layer=1) == 2  # a rate of exactly SINK_LAYER_SHARE (0.5) is a sink layer
    assert first_sink_layer(rate, from_layer=1, share=0.75) == 3
    assert first_sink_layer([0.25, 0.45]) is None


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


def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(7)) == pytest.approx(7, rel=1e-6)
    u, v = torch.randn(20, 1), torch.randn(1, 8)
    assert effective_rank(u @ v) == pytest.approx(1, abs=1e-4)


def test_dominance_ratio_of_one_hot_and_constant():
    D = 16
    assert float(dominance_ratio(F.one_hot(torch.tensor(3), D).float())) == pytest.approx(D)
    assert float(dominance_ratio(torch.full((D,), -2.5))) == pytest.approx(1.0)


def test_the_masked_query_does_not_count_in_what_k_receives():
    """Under the self-only mask, row k is one-hot on k: weight k gives itself, not weight it receives."""
    T, k = 8, 3
    pattern = torch.tril(torch.ones(T, T))
    pattern[k + 1:, k] = 0.0  # no later query looks at k
    pattern[k] = 0.0
    pattern[k, k] = 1.0  # k attends only to itself
    pattern = (pattern / pattern.sum(-1, keepdim=True)).expand(2, 2, T, T)
    assert float(attention_received(pattern)[k]) == 0.0
    without_k = [t for t in range(1, T) if t != k]
    rows = pattern[0, 0, without_k]
    expected = float(-(rows * rows.clamp_min(1e-30).log()).sum(-1).mean())
    assert float(attention_entropy_by_head(pattern, skip=(k,)).mean()) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- the chain, link by link

def planted_chain_model(unit=5, gate_on_token0=1.0, gate_on_others=0.25, scale=3.0):
    """A 2-layer model built by hand, its windows starting with BOS. Every other token embeds as e_0 and BOS as e_1
    (after RMSNorm: 4 e_0 and 4 e_1, C = 16). Layer 0 writes nothing back (W_O = W_down = 0), so both layers read
    the embeddings. Layer 0's FFN unit `unit` reads e_1 and e_0 in W_gate (gate_on_token0, gate_on_others) and both
    in W_up: it fires silu(4 g) * 4 on each. Layer 1's heads put their weight on key 0: W_Q reads e_0 and W_K reads
    e_1 in the slowest RoPE pair (its angle at t < 16 is under 0.02 rad), so q_t . k_0 = 16 scale^2 for t >= 1 and
    every other key scores 0."""
    config = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config).eval()
    C, hd = config.n_embd, config.n_embd // config.n_head
    with torch.no_grad():
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[:, 0] = 1.0
        model.tok_emb.weight[BOS] = F.one_hot(torch.tensor(1), C).float()
        layer0, layer1 = model.blocks
        layer0.attn.wo.weight.zero_()
        layer0.mlp.w_down.weight.zero_()
        for w in (layer0.mlp.w_gate.weight, layer0.mlp.w_up.weight, layer1.mlp.w_gate.weight, layer1.mlp.w_up.weight):
            w.zero_()
        layer0.mlp.w_gate.weight[unit, :2] = torch.tensor([gate_on_others, gate_on_token0])
        layer0.mlp.w_up.weight[unit, :2] = 1.0
        qk = layer1.attn.qkv.weight
        qk[:2 * C].zero_()
        for h in range(config.n_head):
            slow = h * hd + hd // 2 - 1  # the first of the slowest rotating pair (i, i + hd/2)
            qk[slow, 0] = scale  # W_Q: reads e_0
            qk[C + slow, 1] = scale  # W_K: reads e_1, token 0's direction
    return model


def bos_windows(n=8, T=16):
    x = torch.randint(256, (n, T), generator=torch.Generator().manual_seed(3))
    x[:, 0] = BOS
    return x


def test_the_chain_finds_a_sink_layer_where_every_head_attends_to_key_0():
    links = chain_links(planted_chain_model(), bos_windows(), bos=True)
    assert links["sink_rate_by_layer"][1] == 1.0 and links["sink_layer"] == 1 and links["sink_rate"] == 1.0


def test_the_chain_finds_the_planted_token0_unit_with_its_ratio():
    links = chain_links(planted_chain_model(unit=5, gate_on_token0=1.0, gate_on_others=0.25), bos_windows(), bos=True)
    expected = float(F.silu(torch.tensor(4 * 1.0)) / F.silu(torch.tensor(4 * 0.25)))  # the up factor 4 cancels
    assert links["token0_unit"] == [0, 5]
    assert links["token0_unit_ratio"] == pytest.approx(expected, rel=1e-4)


def test_crossings_and_the_paper_order():
    quiet = {name: None if name == "direction_cosine" else 0.0 for name in LINKS}
    series = [{"step": 0, **quiet, "variance_ratio": 5.0},
              {"step": 10, **quiet, "variance_ratio": 5.0, "token0_unit_ratio": 12.0},
              {"step": 100, **quiet, "variance_ratio": 5.0, "token0_unit_ratio": 30.0, "dominance_ratio": 10.0,
               "sink_rate": 0.5}]
    crossed = crossings(series)
    assert (crossed["variance_ratio"], crossed["token0_unit_ratio"], crossed["dominance_ratio"], crossed["sink_rate"]) \
        == (0, 10, 100, 100)
    assert crossed["direction_cosine"] is None and crossed["massive_ratio"] is None
    assert paper_order(crossed) == (["variance", "super neuron", "disparity", "sink"], [], True)
    series[1]["sink_rate"] = 0.6  # the sink before the disparity
    assert paper_order(crossings(series))[2] is False
    series[2]["dominance_ratio"] = 9.99  # just under its bar: never formed, the chain incomplete
    assert paper_order(crossings(series)) == (["variance", "super neuron", "sink"], ["disparity"], False)
    series[0]["variance_ratio"] = 1.0  # the variance bar is strict: ratio > 1
    assert crossings(series)["variance_ratio"] == 10


def test_a_sink_is_a_sink_layer_and_removing_it_leaves_no_sink_head():
    assert not has_sink([0.0013, 0.0, 0.49]) and has_sink([0.1, 0.5])  # one head-window in 768 is not a sink
    assert removes_sink([0.7, 0.1], 0.0) and not removes_sink([0.7, 0.1], 0.001)
    assert not removes_sink([0.0013, 0.0], 0.0)  # no sink to remove

"""The shared measures on hand-built patterns and numbers with known answers."""
import math

import pytest
import torch

from measures import (attention_received, head_attention_received, interval_verdict,
                      norm_spike_layer, paired_interval, sink_rate, sink_scores)


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
    assert int(kept[1:].argmax()) + 1 <= T - 1 - m
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

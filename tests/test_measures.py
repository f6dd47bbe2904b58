"""The shared measures on hand-built patterns and numbers with known answers."""
import math

import pytest
import torch

from measures import (attention_received, head_attention_received, head_sink_scores, interval_verdict,
                      norm_spike_layer, paired_interval, sink_rate)


def uniform_causal(T, B=1, H=1):
    """(B, H, T, T): each query spreads its weight evenly over the keys it can see."""
    causal = torch.tril(torch.ones(T, T))
    return (causal / causal.sum(-1, keepdim=True)).expand(B, H, T, T).clone()


def test_sink_rate_counts_heads_at_or_above_0_3_over_all_queries():
    T = 10
    pattern = uniform_causal(T, H=3)
    pattern[:, 0, 1:] = 0
    pattern[:, 0, 1:, 0] = 1.0  # head 0: every query on token 0: score 1
    pattern[:, 1, 1:] = 0
    pattern[:, 1, 1:, 0] = 0.3  # head 1: 0.3 on token 0 from queries 1..9, and query 0's 1: (1 + 9 * 0.3) / 10 = 0.37
    pattern[:, 1, 1:, 1] = 0.7
    scores = head_sink_scores(pattern)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.37)
    assert scores[2] == pytest.approx(sum(1 / (t + 1) for t in range(T)) / T)  # uniform: 0.29, under 0.3
    by_layer, overall = sink_rate([pattern, uniform_causal(T, H=3)])
    assert by_layer == pytest.approx([2 / 3, 0.0]) and overall == pytest.approx(2 / 6)


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

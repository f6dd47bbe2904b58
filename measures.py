"""
The paper's measures that several scripts share: small pure functions, tensor in, number or
tensor out, so that a test can feed them a hand-built pattern with a known answer.
Shapes: an attention pattern is (B, H, T, T) (query t, key s); a head output (B, H, T, hd);
a residual stream (B, T, C); an FFN's hidden activations (B, T, ffn).
"""
import math

import numpy as np
import torch

SINK_THRESHOLD = 0.3  # Gu et al. (ICLR 2025): a head whose mean attention to token 0 is above this is a sink head
SINK_LAYER_SHARE = 0.5  # ours: a sink layer has Gu et al.'s sink rate at least this (half its heads and windows)
SPIKE_NORM_RATIO = 2.0  # ours, not the paper's: token 0's L2 norm at least 2x the others' mean is the norm spike
MIN_LATER_QUERIES = 8  # ours: a key must be seen by at least 8 later queries for its attention received to count
SUPER_NEURON_Z = 3.0  # ours: a super neuron has a row-norm z-score at least this in both W_gate and W_up


def row_normalized(pattern):
    """Sigmoid weights don't sum to one; measure them as shares: each row over its sum of |A|."""
    return pattern / pattern.abs().sum(-1, keepdim=True).clamp_min(1e-12)


def first_token_attention(pattern):
    """(B, H, T, T) attention -> (H,) mean weight on key 0 over queries t >= 1."""
    return row_normalized(pattern)[:, :, 1:, 0].mean(dim=(0, 2))


def sink_scores(pattern):
    """(B, H, T, T) -> (B, H): Gu et al.'s score of each head in each window, alpha = the mean over
    every query i >= 0 of its (row-normalised) attention to token 0."""
    return row_normalized(pattern)[:, :, :, 0].mean(-1)


def sink_rate(patterns, threshold=SINK_THRESHOLD):
    """Gu et al.'s sink rate (ICLR 2025; sail-sg/Attention-Sink, compute_attention_sink):
    [(B, H, T, T) per layer] -> (rate per layer, rate over all layers). A head is a sink in a window
    when its score there is above the threshold, alpha > 0.3, and the rate is the share of (window,
    head) pairs that are: each window is thresholded before any average over windows."""
    is_sink = [sink_scores(p) > threshold for p in patterns]  # (B, H) bool each
    return [float(s.float().mean()) for s in is_sink], float(torch.cat(is_sink).float().mean())


def first_sink_layer(rate_by_layer, from_layer=0, share=SINK_LAYER_SHARE):
    """The first layer, from from_layer on, whose sink rate (sink_rate's, per layer) is at least share; or None."""
    return next((i for i, rate in enumerate(rate_by_layer) if i >= from_layer and rate >= share), None)


def attention_received(pattern, min_later=1):
    """(B, H, T, T) -> (T,): the mean weight each key j receives from the later queries t > j, over
    heads and windows. Not t >= j: under the mask, query k's weight on itself is not attention k
    receives. Keys seen by fewer than min_later later queries get 0: near the end of the window one
    query (a previous-token head's, say) would decide them (04 uses MIN_LATER_QUERIES)."""
    T = pattern.shape[-1]
    later = torch.tril(torch.ones(T, T), diagonal=-1)  # (query t, key j): 1 where t > j
    received = (row_normalized(pattern).mean(dim=(0, 1)) * later).sum(0) / later.sum(0).clamp_min(1)
    return received.masked_fill(later.sum(0) < min_later, 0.0)


def head_attention_received(pattern, j):
    """(B, H, T, T) -> (H,): each head's mean weight on key j from the later queries t > j."""
    return row_normalized(pattern)[:, :, j + 1:, j].mean(dim=(0, 2))


def attention_entropy_by_head(pattern, skip=()):
    """(B, H, T, T) -> (H,): mean entropy (nats) of the query rows t >= 1 not in skip, each row
    normalised first (sigmoid weights are not shares). Row 0 sees only itself (entropy 0), and so
    does row k under the mask: they would only pull the mean down."""
    rows = [t for t in range(1, pattern.shape[-2]) if t not in skip]
    p = row_normalized(pattern[:, :, rows])  # (B, H, rows, T)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))


def head_output_variance(head_out):
    """(B, H, T, hd) head outputs -> (H,): variance over the head dimensions, mean over windows and positions."""
    return head_out.var(dim=-1).mean(dim=(0, 2))


def rank_correlation(a, b):
    """Spearman's rho of two 1-D sequences: the Pearson correlation of their ranks (float measures have no ties)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def norm_spike_layer(norm_token0, norm_others, ratio=SPIKE_NORM_RATIO):
    """The first layer where token 0's input L2 norm is at least `ratio` times the others', or None."""
    return next((i for i, (a, b) in enumerate(zip(norm_token0, norm_others)) if a >= ratio * b), None)


def dominance_ratio(x):
    """max_i |x_i| / mean_i |x_i| over the last dimension."""
    return x.abs().amax(-1) / x.abs().mean(-1).clamp_min(1e-12)


def token0_dominance_by_window(x):
    """(N, T, C) -> (N,): token 0's dominance ratio in each window."""
    return dominance_ratio(x[:, 0])


def massive_activation_ratio(x):
    """max_i |x_i| / median_i |x_i| over the last dimension (Sun et al. 2024)."""
    return x.abs().amax(-1) / x.abs().median(-1).values.clamp_min(1e-12)


def effective_rank(hidden):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of (N, D)."""
    s = torch.linalg.svdvals(hidden.double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


def mean_effective_rank(x):
    """(N, T, C) -> the effective rank of each window's (T, C) hidden states, averaged over windows."""
    return float(np.mean([effective_rank(window) for window in x]))


def row_norms(weight):
    """(rows, C) weight -> (rows,): the L2 norm of each row, in float32 on the CPU."""
    return weight.detach().float().cpu().norm(dim=1)


def zscores(values):
    """(n,) -> (n,): each value's distance from the mean, in standard deviations."""
    return (values - values.mean()) / values.std().clamp_min(1e-12)


def row_norm_zscores(w_gate, w_up):
    """W_gate, W_up (ffn, C) each -> (z of W_gate row norms, z of W_up row norms), each (ffn,): one per
    hidden unit (Fig. 8)."""
    return zscores(row_norms(w_gate)), zscores(row_norms(w_up))


def early_layers(n_layer):
    """Where the paper finds super neurons: the first layers (0 and 1; the first quarter of a deep model)."""
    return list(range(min(n_layer, max(2, n_layer // 4))))


def unit_with_largest_row_norms(zscores_by_layer):
    """The super neuron found by its weights: {layer: (z_gate, z_up), (ffn,) each} -> (layer, unit),
    the unit with the largest z(W_gate row norm) + z(W_up row norm) (the paper's Fig. 8)."""
    best = max((float((z_gate + z_up).max()), layer, int((z_gate + z_up).argmax()))
               for layer, (z_gate, z_up) in zscores_by_layer.items())
    return best[1], best[2]


def unit_most_active_on_token0(hidden):
    """(N, T, ffn) -> the unit with the largest mean |activation| on token 0 (Yu et al.'s super neuron;
    T may be 1: only token 0 is read)."""
    return int(hidden[:, 0].abs().mean(0).argmax())


def unit_most_selective_for_token0(hidden_by_layer):
    """The FFN unit that fires most on token 0 against the others, found by its activations:
    {layer: (N, T, ffn) hidden activations} -> (layer, unit, mean |act| on token 0 / mean on t >= 1)."""
    best = (0.0, 0, 0)
    for layer, hidden in hidden_by_layer.items():
        ratio = hidden[:, 0].abs().mean(0) / hidden[:, 1:].abs().mean(dim=(0, 1)).clamp_min(1e-12)  # (ffn,)
        best = max(best, (float(ratio.max()), layer, int(ratio.argmax())))
    return best[1], best[2], best[0]


def token0_activation_ratio(hidden, unit):
    """(N, T, ffn) activations -> mean |activation| of `unit` on token 0 over its mean on t >= 1."""
    a = hidden[..., unit].abs()
    return float(a[:, 0].mean() / a[:, 1:].mean().clamp_min(1e-12))


def super_neuron_record(layer, unit, z_gate, z_up, hidden, z_threshold=SUPER_NEURON_Z):
    """What 02 and 04 report about an FFN unit found by its weights, with Yu et al.'s cross-check by
    activation: z_gate, z_up (ffn,) the row-norm z-scores of its layer; hidden (N, T, ffn) its layer's
    activations on the held-out windows."""
    most_active = unit_most_active_on_token0(hidden)
    return dict(layer=layer, unit=unit, gate_norm_z=float(z_gate[unit]), up_norm_z=float(z_up[unit]),
                rule_met=bool(z_gate[unit] >= z_threshold and z_up[unit] >= z_threshold),
                token0_activation_ratio=token0_activation_ratio(hidden, unit),
                activation_token0=float(hidden[:, 0, unit].mean()),
                activation_argmax_unit=most_active, activation_argmax_agrees=most_active == unit)


def variance_by_position(head_out):
    """(B, H, T, hd) head outputs -> two (T,) readings of their variance at each position:
    per dimension across sequences (var over B, mean over H, hd), and
    across dimensions within one token (var over hd, mean over B, H)."""
    across_sequences = head_out.var(dim=0).mean(dim=(0, 2))
    within_token = head_out.var(dim=-1).mean(dim=(0, 1))
    return across_sequences, within_token


# t_{0.975, df}, Student's t distribution: the 95 % two-sided quantile for n - 1 degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def paired_interval(a, b):
    """Paired by seed: the mean of a - b and its 95 % t interval over seeds, (mean, low, high).
    With one seed there is no interval: (mean, None, None)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()), None, None
    df = len(d) - 1
    t = T_975[max(k for k in T_975 if k <= df)] if df <= 30 else 1.960  # a smaller df in the table: wider, safe
    half = t * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def interval_verdict(low, high, below="lower", above="higher"):
    """What a 95 % interval of a difference says: below or above zero, or not distinguishable."""
    if low is None:
        return "one seed: no interval"
    return below if high < 0 else above if low > 0 else "not distinguishable at this budget"

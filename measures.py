"""
The paper's measures that several scripts share: small pure functions, tensor in, number or
tensor out, so that a test can feed them a hand-built pattern with a known answer.
Shapes: an attention pattern is (B, H, T, T) (query t, key s); a head output (B, H, T, hd);
a residual stream (B, T, C); an FFN's hidden activations (B, T, ffn).

The last section, "The chain", measures every link of the paper's chain on one model at once
(chain_links), to follow it along training (training's snapshots; 01 and 05 print it).
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from model import self_only_mask

SINK_THRESHOLD = 0.3  # Gu et al. (ICLR 2025): a head whose mean attention to token 0 is above this is a sink head
SINK_LAYER_SHARE = 0.5  # ours: a sink layer has Gu et al.'s sink rate at least this (half its heads and windows)
SPIKE_NORM_RATIO = 2.0  # ours, not the paper's: token 0's L2 norm at least 2x the others' mean is the norm spike
MIN_LATER_QUERIES = 8  # ours: a key must be seen by at least 8 later queries for its attention received to count
SUPER_NEURON_Z = 3.0  # ours: a super neuron has a row-norm z-score at least this in both W_gate and W_up
# The paper draws the later links without numbers; these bars are ours (docs/results.md):
TOKEN0_UNIT_RATIO = 10.0  # ours: an FFN unit fires on token 0 at least 10x its mean |activation| on the others
MASSIVE_RATIO = 10.0  # ours: token 0's max/median |x| (Sun et al.'s massive activation) at least 10x the others'
DOMINANCE_RATIO = 10.0  # ours: token 0's dominance ratio after RMSNorm at least 10x the others'
DIRECTION_COSINE = 0.9  # ours: token 0's direction across windows fixed, a mean pairwise cosine at least 0.9
MASK_GAIN = 10.0  # ours: under the mask, k receives at least 10x its unmasked attention (the paper's Fig. 5 shows a peak)
MASK_UNIT_GAIN = 5.0  # ours: under the mask, the token-0 unit fires at k at least 5x its unmasked |activation|


def row_normalized(pattern):
    """Sigmoid's weights, and a slot model's over the real keys, don't sum to one; measure them as
    shares: each row over its sum of |A| (Gu et al.'s formula, the slot's share left out)."""
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


def has_sink(rate_by_layer):
    """The project's rule for a model with a sink (01's): a sink layer, Gu et al.'s rate at least SINK_LAYER_SHARE."""
    return first_sink_layer(rate_by_layer) is not None


def removes_sink(baseline_rate_by_layer, fix_rate):
    """A fix removes the sink: the baseline has one (has_sink) and the fix not one sink head in any window."""
    return has_sink(baseline_rate_by_layer) and fix_rate == 0


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


def token0_norms(resid):
    """(N, T, C) residual stream -> (token 0's mean L2 norm, the mean over positions t >= 1)."""
    norms = resid.norm(dim=-1)  # (N, T)
    return float(norms[:, 0].mean()), float(norms[:, 1:].mean())


def mean_pairwise_cosine(states):
    """(N, ..., C) -> (...): mean cosine similarity over the N(N-1) ordered pairs of different rows along dim 0.
    1 when all N vectors point the same way; about 0 for random directions."""
    unit = F.normalize(states, dim=-1)  # (N, ..., C)
    total = unit.sum(dim=0)  # (..., C); |sum|^2 = sum over all pairs, the N self-pairs included
    n = states.shape[0]
    return ((total * total).sum(-1) - n) / (n * (n - 1))


def spike_or_largest_ratio(norms):
    """[(token 0's norm, the others') per layer] -> (the first layer of the norm spike, or without one the layer
    of the largest ratio; which of the two it is): where 03 reads token 0's direction and QK locking."""
    spike = norm_spike_layer(*zip(*norms))
    if spike is not None:
        return spike, "the first norm spike"
    return int(np.argmax([a / b for a, b in norms])), "no norm spike: the largest ratio"


def direction_from_layer(cosine_by_layer, layer):
    """Token 0's direction cosine across windows from `layer` on (spike_or_largest_ratio's): the smallest."""
    return min(cosine_by_layer[layer:])


def dominance_ratio(x):
    """max_i |x_i| / mean_i |x_i| over the last dimension."""
    return x.abs().amax(-1) / x.abs().mean(-1).clamp_min(1e-12)


def token0_dominance_by_window(x):
    """(N, T, C) -> (N,): token 0's dominance ratio in each window."""
    return dominance_ratio(x[:, 0])


def massive_activation_ratio(x):
    """max_i |x_i| / median_i |x_i| over the last dimension (Sun et al. 2024)."""
    return x.abs().amax(-1) / x.abs().median(-1).values.clamp_min(1e-12)


def token0_massive_over_others(resid):
    """(N, T, C) residual stream -> token 0's mean max/median |x| over the mean of the positions t >= 1."""
    return float(massive_activation_ratio(resid[:, 0]).mean() / massive_activation_ratio(resid[:, 1:]).mean())


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


def variance_ratio_token0(variance):
    """(T,) variance per position -> variance at position 0 over the mean at positions >= 1."""
    return float(variance[0] / variance[1:].mean().clamp_min(1e-30))


def variance_reading(bos):
    """Which of variance_by_position's readings token 0's variance ratio uses. With BOS, token 0 is the same in
    every window: its variance across windows is 0 by construction, so the ratio reads the variance within a
    token; without BOS, the paper's reading, across windows."""
    return "within_token" if bos else "across_sequences"


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


# ----------------------------------------------------------------------------- the mask intervention's passes (04)

def default_k(T):
    """The position 04 turns into a sink by default: 10, or the middle of a shorter window."""
    return 10 if T > 10 else T // 2


def layer_summary(pattern, k):
    """One layer's attention (N, H, T, T) reduced to what 04 prints of it: about key k and every key j, the
    attention it receives; about token 0, Gu et al.'s sink rate and the first token's attention."""
    return dict(received=attention_received(pattern),  # (T,)
                received_seen=attention_received(pattern, MIN_LATER_QUERIES),  # (T,)
                heads_over_threshold_on_k=int((head_attention_received(pattern, k) >= SINK_THRESHOLD).sum()),
                entropy=float(attention_entropy_by_head(pattern, skip=(k,)).mean()),
                first_token_attention=float(first_token_attention(pattern).mean()),
                sink_rate=sink_rate([pattern])[0][0])  # Gu et al.'s sink rate of this layer alone


def layer_mean(summaries, layers, key="received"):
    """The mean over `layers` of one entry of their layer summaries, e.g. attention received (T,)."""
    return torch.stack([summaries[i][key] for i in layers]).mean(0)


def token0_unit_chain(hidden, k):
    """The token-0 unit, found by its activations {layer: (N, T, ffn)} in the early layers, and its mean
    |activation| on token 0 and at k."""
    layer, unit, ratio = unit_most_selective_for_token0(hidden)
    return dict(layer=layer, unit=unit, token0_ratio=ratio, at_token0=float(hidden[layer][:, 0, unit].abs().mean()),
                at_k_unmasked=float(hidden[layer][:, k, unit].abs().mean()))


def mask_passes(model, x, k, from_layer):
    """The baseline pass and the masked one (token k attends only to itself in layers from_layer..last), each
    layer's attention reduced by layer_summary as it passes -> dict(baseline, masked: a summary per layer,
    token0_unit: the chain at k, the token-0 unit found in the baseline and its |activation| at k in both passes)."""
    n_layer, T = model.config.n_layer, x.shape[1]
    summaries = {f"blocks.{i}.attn.hook_pattern": partial(layer_summary, k=k) for i in range(n_layer)}
    early = {i: f"blocks.{i}.mlp.hook_hidden" for i in early_layers(n_layer)}
    _, baseline = model.run_with_cache(x, record=early.values(), reduce=summaries, last_layer=n_layer - 1)
    chain = token0_unit_chain({i: baseline.pop(name) for i, name in early.items()}, k)  # released before the next pass
    unit_at_k = {early[chain["layer"]]: lambda hidden: float(hidden[:, k, chain["unit"]].abs().mean())}
    _, masked = model.run_with_cache(x, reduce={**summaries, **unit_at_k}, last_layer=n_layer - 1,
                                     mask=self_only_mask(T, k, x.device), mask_layers=range(from_layer, n_layer))
    chain["at_k_masked"] = masked.pop(early[chain["layer"]])
    return dict(baseline=[baseline[name] for name in summaries], masked=[masked[name] for name in summaries],
                token0_unit=chain)


# ----------------------------------------------------------------------------- the chain, link by link

# Each link of the paper's chain as one number, and when it counts as formed: the number at least the bar
# (above it, where `strict`), the bar's source, and the paper's step it stands for (None: a link measured
# beside the four steps). The scripts print the same bars, from the constants above.
LINKS = {
    "variance_ratio": dict(label="token 0's layer-0 output variance / others' (01)", bar=1.0, strict=True,
                           source="paper §3: token 0 the high-variance outlier", step="variance"),
    "norm_ratio": dict(label="token 0's residual norm / others', largest layer (01)", bar=SPIKE_NORM_RATIO,
                       source="ours: the norm spike", step=None),
    "token0_unit_ratio": dict(label="strongest token-0 FFN unit, |act| on 0 / others (02, 04)", bar=TOKEN0_UNIT_RATIO,
                              source="ours", step="super neuron"),
    "token0_unit_z": dict(label="that unit's row-norm z, smaller of W_gate's, W_up's (02)", bar=SUPER_NEURON_Z,
                          source="ours", step=None),
    "massive_ratio": dict(label="token 0's max/median |x| / others', largest layer (02)", bar=MASSIVE_RATIO,
                          source="ours, on Sun et al.'s measure", step=None),
    "dominance_ratio": dict(label="token 0's dominance ratio / others', largest layer (03)", bar=DOMINANCE_RATIO,
                            source="ours", step="disparity"),
    "direction_cosine": dict(label="token 0's direction cosine from the spike (or largest norm) on (03)",
                             bar=DIRECTION_COSINE, source="ours", step=None),
    "sink_rate": dict(label="Gu et al.'s sink rate, largest layer (01)", bar=SINK_LAYER_SHARE,
                      source=f"Gu et al.'s alpha > {SINK_THRESHOLD} per head and window; a sink layer at "
                             f"{SINK_LAYER_SHARE}, ours", step="sink"),
    "mask_attention_gain": dict(label="attention to k, masked / unmasked (04)", bar=MASK_GAIN, source="ours",
                                step=None),
    "mask_unit_gain": dict(label="the token-0 unit at k, masked / unmasked (04)", bar=MASK_UNIT_GAIN, source="ours",
                           step=None),
}
PAPER_ORDER = ("variance", "super neuron", "disparity", "sink")  # the paper's chain, cause before effect


def link_formed(name, value):
    """Whether a link's value (chain_links') passes its bar in LINKS; None (not measurable) never does."""
    bar = LINKS[name]["bar"]
    return value is not None and (value > bar if LINKS[name].get("strict") else value >= bar)


def chain_links(model, x, bos, k=None):
    """Every link of the paper's chain on one model, on held-out windows x (N, T): each measured as the script that
    shows it measures it -> {link name in LINKS: number or None, and per-layer details}. Three passes: 04's two
    (its patterns reduced as they go) and one that records the residual streams. k: the masked position (04's)."""
    n_layer, T = model.config.n_layer, x.shape[1]
    k = default_k(T) if k is None else k
    passes = mask_passes(model, x, k, from_layer=0)
    _, cache = model.run_with_cache(x, record=["blocks.0.attn.hook_head_out", "blocks.*.hook_resid_in",
                                               "blocks.*.hook_attn_in", "hook_resid_final"])
    resid = [cache[f"blocks.{i}.hook_resid_in"] for i in range(n_layer)]  # (N, T, C) each, entering block i
    normed = [cache[f"blocks.{i}.hook_attn_in"] for i in range(n_layer)]  # (N, T, C) after each block's RMSNorm
    # 01: the variance of layer 0's aggregation output by position; the norm of the stream entering each block
    across, within = variance_by_position(cache["blocks.0.attn.hook_head_out"])  # (T,) each
    variance = within if variance_reading(bos) == "within_token" else across
    norms = [token0_norms(r) for r in resid]  # (token 0's, the others') each
    spike, direction_layer = norm_spike_layer(*zip(*norms)), spike_or_largest_ratio(norms)[0]
    # 02 and 04: the token-0 unit, by its activations, and its weights' row-norm z-scores
    unit = passes["token0_unit"]
    mlp = model.blocks[unit["layer"]].mlp
    z_gate, z_up = row_norm_zscores(mlp.w_gate.weight, mlp.w_up.weight)
    massive = [token0_massive_over_others(r) for r in resid[1:] + [cache["hook_resid_final"]]]  # after each block
    # 03: dominance after RMSNorm, and token 0's direction across windows
    dominance = [float(dominance_ratio(n[:, 0]).mean() / dominance_ratio(n[:, 1:]).mean()) for n in normed]
    cosine = [float(mean_pairwise_cosine(n[:, 0])) for n in normed]
    # 01 and 04: Gu et al.'s sink rate by layer; the mask's effect at k, over the layers after the first masked one
    rate = [s["sink_rate"] for s in passes["baseline"]]
    later = range(1, n_layer)
    received = {name: float(layer_mean(passes[name], later)[k]) for name in ("baseline", "masked")}
    return {"variance_ratio": variance_ratio_token0(variance),
            "norm_ratio": max(a / b for a, b in norms), "norm_ratio_by_layer": [a / b for a, b in norms],
            "spike_layer": spike,
            "token0_unit_ratio": unit["token0_ratio"], "token0_unit": [unit["layer"], unit["unit"]],
            "token0_unit_z": float(min(z_gate[unit["unit"]], z_up[unit["unit"]])),
            "massive_ratio": max(massive), "massive_ratio_by_layer": massive,
            "dominance_ratio": max(dominance), "dominance_ratio_by_layer": dominance,
            "direction_cosine": direction_from_layer(cosine, direction_layer), "direction_cosine_by_layer": cosine,
            "sink_rate": max(rate), "sink_rate_by_layer": rate, "sink_layer": first_sink_layer(rate),
            "k": k, "attention_to_k_unmasked": received["baseline"], "attention_to_k_masked": received["masked"],
            "mask_attention_gain": received["masked"] / max(received["baseline"], 1e-12),
            "mask_unit_gain": unit["at_k_masked"] / max(unit["at_k_unmasked"], 1e-12)}


def crossings(series):
    """[{"step", **chain_links} per snapshot, in training order] -> {link: the first step at which it is formed,
    or None if it never is}."""
    return {name: next((s["step"] for s in series if link_formed(name, s[name])), None) for name in LINKS}


def paper_order(crossed):
    """crossings' steps -> (the paper's four steps that formed, in the order they formed, the steps that never
    formed, whether the order is the paper's: every step formed, none before the one it follows)."""
    step_of = {LINKS[name]["step"]: crossed[name] for name in LINKS if LINKS[name]["step"]}
    formed = sorted((s for s in PAPER_ORDER if step_of[s] is not None), key=lambda s: (step_of[s], PAPER_ORDER.index(s)))
    never = [s for s in PAPER_ORDER if step_of[s] is None]
    in_order = not never and all(step_of[a] <= step_of[b] for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))
    return formed, never, in_order

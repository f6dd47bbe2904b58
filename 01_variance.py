"""
01 - Variance discrepancy: token 0 cannot aggregate (paper §3; Fig. 1, 3, 7, 13).

Claim. With a causal mask, token 0 attends only to itself, so its head output is one value
vector, while token t averages t + 1 values. Under near-uniform attention the variance of the
head output falls roughly like 1/(t+1): token 0 is a high-variance outlier. This holds at
random initialisation and, in the trained model, on random tokens too, so it is about the
position, not the content (Fig. 1). W_O keeps the discrepancy: its weight magnitude per input
dimension correlates with token 0's per-dimension magnitude (Kendall tau, 0.32 in Llama-2
layer 1), and after W_O token 0's variance is still far above the others' (Fig. 7). From the
layer where token 0's input norm spikes, attention to token 0 jumps (Fig. 3). Across the heads
of a layer, the low-entropy heads (those that park their attention) give the high-variance
outputs (Fig. 13).

What this script measures, on 64 held-out windows (16 for a pretrained model) and as many random-token windows:
  - the variance of layer 0's head outputs (blocks.0.attn.hook_head_out, the value
    aggregation before W_O) at each position, in two readings (measures.variance_by_position):
    per dimension across windows, and across dimensions within one token; for the
    random-init model, the trained model on text, and the trained model on random tokens;
  - var_ratio_token0: the variance at position 0 over its mean at positions >= 1, in the
    paper's reading (per dimension across windows). With a BOS token at position 0 (the
    cpu_bos profile) every window's token 0 is the same token, its variance across windows
    is exactly 0 (Exercise 1), and the ratio reads the within-token variance instead;
  - the next-token loss on the held-out windows (for a pretrained model: the proof that it
    was read correctly, far below ln of its vocabulary size);
  - per layer: the mean attention to token 0 (queries t >= 1, all heads), and the L2 norm of
    token 0's residual stream entering the block beside the others' mean (Fig. 3); Gu et al.'s
    sink rate (measures.sink_rate: the share of (window, head) pairs whose mean attention to
    token 0 over all queries is above 0.3), per layer and over all layers; the first sink
    layer, the first whose sink rate is at least 0.5, and the first layer of the norm spike;
  - per layer: Kendall tau-b between the L2 norm of each W_O input column and token 0's
    per-dimension spread at the W_O input (within its token), and the same tau against the
    paper's reading: the variance of each of token 0's W_O-input dimensions across the
    windows (0 everywhere with BOS, then tau is 0); one tau per W_O output row (|weights| of
    the row against the within-token spread), as a distribution and its mean; and the
    within-token variance ratio of token 0 to the others after W_O (blocks.{i}.attn.hook_out;
    Fig. 7, right);
  - per layer (Fig. 13): Spearman's rho, over the layer's heads, between each head's attention
    entropy (rows t >= 1, each row over its sum) and the variance of its output
    (hook_head_out: over the head dimensions, mean over windows and positions); the figure
    shows the first sink layer (or, without a sink, the layer with the most attention to
    token 0), heads sorted by entropy.
"Layer i" is the residual stream entering block i. A small model may not show every link;
the script prints its numbers and says so.

Run:  python 01_variance.py [--quick] [--model smollm2-135m]
      (figures and metrics.json in out/01_variance/, or out/01_variance/<model>/)

Exercises (cpu profile; each takes seconds once the model is cached)
  1. Reading. `variance_by_position` (measures.py) takes the across-sequences variance over
     dim 0 (the windows). Run `python 01_variance.py --profile cpu_bos` (the recipe with a
     BOS token that 05 uses; it trains in 4 to 5 minutes). Why is
     `var_by_position_trained["across_sequences"][0]` then exactly 0, and in which of the
     three cases? Why not with the default profile?
  2. Reading. `kendall_tau_b` counts concordant minus discordant pairs. What does it give for
     a vector against itself, and against its reverse? How would you read a
     `wo_kendall_tau_by_layer` entry of 0?
  3. Predicting. If every query attended uniformly to independent values, the variance at
     position t would be var_0 / (t+1). Compute what this predicts for `var_ratio_token0`
     with T = 64 (1 / mean over t = 1..63 of 1/(t+1)), then compare with the "init" entry.
     Which of the two readings in fig1's left panel falls off more like the dotted 1/(t+1)
     line, and why might text (bytes repeat within a window) fall short of the prediction?
  4. Changing code. Add a flag `--init_random_tokens` that adds a fourth case
     "init_random_tokens" to `by_case` in `variance_discrepancy`: the random-init model on the
     random-token windows `x_random` (its metrics key is then
     `var_by_position_init_random_tokens`). Predict the across-sequences variance at position 0
     over its mean at t >= 1 for that case, run, and compare with exercise 3: random bytes do
     not repeat the way text does.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from cli import (N_WINDOWS, cost_text, emergence, layer_ticks, order_text, plot_emergence, plot_head_entropy,
                 print_emergence_table, print_link_bars, print_table, run_script, save_figure, script_parser, setup,
                 studied_model, write_metrics)
import matplotlib.pyplot as plt  # after cli, which chooses matplotlib's file-only backend
from data import random_token_windows
from measures import (SINK_LAYER_SHARE, SINK_THRESHOLD, SPIKE_NORM_RATIO, attention_entropy_by_head, first_sink_layer,
                      first_token_attention, head_output_variance, norm_spike_layer, rank_correlation, sink_rate,
                      token0_norms, variance_by_position, variance_ratio_token0, variance_reading)
from model import GPT

CASE_TITLES = {"init": "random init, text", "trained": "trained, text", "random_tokens": "trained, random tokens"}
LAYER_HOOKS = ["blocks.*.hook_resid_in", "blocks.*.attn.hook_pattern", "blocks.*.attn.hook_head_out",
               "blocks.*.attn.hook_head_out_post", "blocks.*.attn.hook_out"]


# ----------------------------------------------------------------------------- measures

def kendall_tau_b(x, y):
    """Kendall's tau-b of two 1-D sequences, in numpy (scipy is not a dependency):
    (concordant - discordant pairs) / sqrt((pairs not tied in x) * (pairs not tied in y))."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    upper = np.triu_indices(len(x), k=1)  # each pair i < j once
    sx = np.sign(x[:, None] - x[None, :])[upper]
    sy = np.sign(y[:, None] - y[None, :])[upper]
    denominator = np.sqrt((sx != 0).sum() * (sy != 0).sum())
    return float((sx * sy).sum() / denominator) if denominator > 0 else 0.0


def within_token_variance_ratio(out):
    """(N, T, C) -> token 0's variance across its C dimensions over the others' (means over windows)."""
    return variance_ratio_token0(out.var(dim=-1).mean(dim=0))


def token0_dimension_spread(head_out):
    """(N, H, T, hd) head outputs -> (H * hd,) token 0's squared deviation from its own mean over
    the head's dimensions, per dimension, averaged over windows; ordered as W_O's inputs (h * hd + d).
    Why not the variance across windows: with BOS, token 0 is the same in every window and that
    variance is 0. This is each dimension's share of the within-token reading used above."""
    x0 = head_out[:, :, 0]  # (N, H, hd)
    spread = (x0 - x0.mean(dim=-1, keepdim=True)).pow(2).mean(dim=0)  # (H, hd)
    return spread.flatten()


def token0_variance_across_windows(head_out):
    """(N, H, T, hd) head outputs -> (H * hd,) the variance over the N windows of each of token 0's
    dimensions, ordered as W_O's inputs (h * hd + d): the paper's reading of Fig. 7."""
    return head_out[:, :, 0].var(dim=0).flatten()


def wo_row_taus(wo_weight, spread, max_rows=256):
    """The paper's Fig. 7 (left): for each W_O output row (C_out, C_in), Kendall tau-b between
    the |weights| of that row and token 0's spread over the C_in inputs -> a list, one per row.
    A wide model's rows are taken evenly spaced, max_rows of them: each tau costs O(C_in^2)."""
    rows = wo_weight.abs()[::max(1, len(wo_weight) // max_rows)]
    return [kendall_tau_b(row, spread) for row in rows.numpy()]


def random_init_like(model):
    """A random initialisation of model's architecture, built straight in its dtype and on its device:
    no float32 copy on the CPU first (28 GB for a 7B model). On the CPU in float32, the same
    numbers as GPT(config) for the same seed."""
    weight = model.tok_emb.weight
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(weight.dtype)
    try:
        with torch.device(weight.device):
            return GPT(model.config).to(weight.dtype).eval()  # .to: the RoPE tables are made in float32
    finally:
        torch.set_default_dtype(default_dtype)


def layer0_variance(model, x):
    """{"across_sequences": [...], "within_token": [...]} of layer 0's head outputs on windows x (N, T).
    o_t = sum_{s <= t} A_ts v_s: token 0's output is v_0 alone, and uniform attention over
    t + 1 independent values gives var(o_t) = var(v) / (t + 1) (paper §3)."""
    _, cache = model.run_with_cache(x, record="blocks.0.attn.hook_head_out", last_layer=0)
    across, within = variance_by_position(cache["blocks.0.attn.hook_head_out"])  # (T,) each
    return {"across_sequences": across.tolist(), "within_token": within.tolist()}


def sink_follows_spike(spike, sink):
    """The paper's order (Fig. 3): the sink starts in the layer of the norm spike or the next, never before."""
    return spike is not None and sink is not None and spike <= sink <= spike + 1


def fig13_layer(metrics):
    """The layer Fig. 13 shows, and why: the first sink layer; without one, the most attention to token 0."""
    if metrics["sink_layer"] is not None:
        return metrics["sink_layer"], "the first sink layer"
    return int(np.argmax(metrics["first_token_attention_by_layer"])), "no sink: most attention to token 0"


# ----------------------------------------------------------------------------- the paper's steps

def variance_discrepancy(model, x, x_random, bos, seed):
    """Fig. 1: the variance of layer 0's head outputs by position, on the random-init model and the trained
    one on text, and on the trained one on random tokens; token 0's variance over the others' in each case."""
    torch.manual_seed(seed)  # the random initialisation
    by_case = {"init": layer0_variance(random_init_like(model), x),  # freed after its one pass
               "trained": layer0_variance(model, x),
               "random_tokens": layer0_variance(model, x_random)}
    reading = variance_reading(bos)  # with BOS, within a token: token 0's variance across windows is 0
    return {**{f"var_by_position_{case}": variance for case, variance in by_case.items()},
            "var_ratio_token0": {case: variance_ratio_token0(torch.tensor(v[reading])) for case, v in by_case.items()},
            "var_ratio_reading": reading}


def held_out_loss(logits, x):
    """The next-token loss of logits (N, T, vocab) on the windows x (N, T), in nats."""
    return {"held_out_loss": float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))}


def sink_and_norm(cache, layers):
    """Fig. 3, per layer: attention to token 0, Gu et al.'s sink rate, the L2 norm of token 0's residual stream
    entering the block beside the others'; the first norm spike and sink layers, and whether they are in order."""
    patterns = [cache[f"blocks.{i}.attn.hook_pattern"] for i in layers]  # (N, H, T, T) each
    rate_by_layer, rate = sink_rate(patterns)
    norm0, norm_others = zip(*(token0_norms(cache[f"blocks.{i}.hook_resid_in"]) for i in layers))
    spike, sink = norm_spike_layer(norm0, norm_others), first_sink_layer(rate_by_layer)
    return {"first_token_attention_by_layer": [float(first_token_attention(p).mean()) for p in patterns],
            "sink_rate_by_layer": rate_by_layer, "sink_rate": rate,
            "first_token_norm_by_layer": list(norm0), "other_token_norm_by_layer": list(norm_others),
            "spike_layer": spike, "sink_layer": sink, "sink_follows_spike": sink_follows_spike(spike, sink)}


def wo_keeps_variance(model, cache, layers):
    """Fig. 7, per layer: Kendall tau-b of the W_O column norms against token 0's spread within the token and
    against its variance across windows, one tau per W_O row, and token 0's variance ratio after W_O."""
    taus, taus_across, row_taus, post_ratio = [], [], [], []
    for i in layers:
        wo_weight = model.blocks[i].attn.wo.weight.detach().float().cpu()  # (C_out, C_in): a column per W_O input
        column_norms = wo_weight.norm(dim=0).numpy()  # (C_in,)
        to_wo = cache[f"blocks.{i}.attn.hook_head_out_post"]  # (N, H, T, hd): what W_O gets
        spread = token0_dimension_spread(to_wo).numpy()  # (C_in,)
        taus.append(kendall_tau_b(column_norms, spread))
        taus_across.append(kendall_tau_b(column_norms, token0_variance_across_windows(to_wo).numpy()))
        row_taus.append(wo_row_taus(wo_weight, spread))
        post_ratio.append(within_token_variance_ratio(cache[f"blocks.{i}.attn.hook_out"]))
    return {"wo_kendall_tau_by_layer": taus, "wo_kendall_tau_across_windows_by_layer": taus_across,
            "wo_row_kendall_taus_by_layer": row_taus,
            "wo_row_kendall_tau_mean_by_layer": [float(np.mean(t)) for t in row_taus],
            "post_wo_var_ratio_by_layer": post_ratio}


def entropy_and_variance(cache, layers):
    """Fig. 13, per layer: each head's attention entropy and output variance, and their Spearman rho over the heads."""
    entropy = [attention_entropy_by_head(cache[f"blocks.{i}.attn.hook_pattern"]) for i in layers]  # (H,) each
    variance = [head_output_variance(cache[f"blocks.{i}.attn.hook_head_out"]) for i in layers]  # (H,) each
    return {"head_entropy_by_layer": [e.tolist() for e in entropy],
            "head_output_variance_by_layer": [v.tolist() for v in variance],
            "head_entropy_variance_spearman_by_layer": [rank_correlation(e.numpy(), v.numpy())
                                                        for e, v in zip(entropy, variance)]}


def chain_over_training(run, x, bos):
    """The chain as the studied model grew: every link at each snapshot its training kept (cli.emergence) ->
    ({"softmax": {seed: result}}, its cost), or (None, None) for a pretrained model (it has no snapshots) and
    with --snapshots 0."""
    if run.pretrained is not None or run.snapshots == 0:
        return None, None
    result, cost = emergence(run, "softmax", run.seed, x, bos)
    return {"softmax": {str(run.seed): result}}, cost


# ----------------------------------------------------------------------------- figures

def plot_variance(metrics, path):
    cases = list(metrics["var_ratio_token0"])
    fig, axes = plt.subplots(1, len(cases), figsize=(4.7 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        variance = metrics[f"var_by_position_{case}"]
        within, across = np.array(variance["within_token"]), np.array(variance["across_sequences"])
        positions = np.arange(len(within))
        ax.plot(positions, within, "o-", markersize=3, color="tab:red", label="within token (var over dims)")
        ax.plot(positions, np.where(across > 0, across, np.nan), "s-", markersize=3, color="tab:blue",
                label="across sequences (var over windows)")
        ax.plot(positions, within[0] / (positions + 1), ":", color="black", label="within[0] / (t+1): uniform attention")
        ax.set(yscale="log", xlabel="position t", ylabel="variance of layer-0 head output",
               title=f"Fig. 1: {CASE_TITLES.get(case, case)}")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_attention_and_norm(metrics, path):
    attention = metrics["first_token_attention_by_layer"]
    layers = list(range(len(attention)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, attention, "o-", color="tab:red", label="attention to token 0")
    ax.axhline(SINK_THRESHOLD, color="tab:red", linewidth=0.5, linestyle=":")
    ax.set(xlabel="layer (residual stream entering the block)", ylabel="mean attention to token 0", ylim=(0, 1),
           xticks=layer_ticks(layers), title="Fig. 3: first-token attention and input norm")
    ax.yaxis.label.set_color("tab:red")
    twin = ax.twinx()
    twin.plot(layers, metrics["first_token_norm_by_layer"], "s-", color="tab:blue", label="token 0 input L2 norm")
    twin.plot(layers, metrics["other_token_norm_by_layer"], "^--", color="tab:cyan", label="tokens t ≥ 1 (mean)")
    twin.set_ylabel("input L2 norm", color="tab:blue")
    twin.set_ylim(0, None)
    lines = ax.get_lines()[:1] + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    save_figure(fig, path)


def plot_wo(metrics, row_taus, path):
    layers = list(range(len(metrics["wo_kendall_tau_by_layer"])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot(row_taus, positions=layers, widths=0.5, manage_ticks=False)  # else its labels outlive xticks below
    left.scatter(layers, metrics["wo_kendall_tau_by_layer"], marker="D", color="tab:blue", zorder=3,
                 label="|W_O column| vs spread within token 0")
    left.scatter(layers, metrics["wo_kendall_tau_across_windows_by_layer"], marker="o", color="tab:green", zorder=3,
                 label="|W_O column| vs variance across windows")
    left.axhline(0, color="black", linewidth=0.5)
    left.set(xlabel="layer", ylabel="Kendall tau-b with token 0's dimensions", xticks=layer_ticks(layers),
             ylim=(-1, 1), title="Fig. 7: W_O weights vs token 0's variance")
    left.legend(fontsize=8, title="box: one tau per W_O row", title_fontsize=8)
    right.plot(layers, metrics["post_wo_var_ratio_by_layer"], "o-", color="tab:red")
    right.axhline(1, color="gray", linestyle=":", label="no discrepancy")
    right.set(xlabel="layer", ylabel="token 0 variance / others' after W_O", xticks=layer_ticks(layers), yscale="log",
              title="Fig. 7: variance ratio after W_O")
    right.legend()
    save_figure(fig, path)


def plot_entropy_and_variance(metrics, window, path):
    """Fig. 13 in one layer (fig13_layer's); the dotted line: uniform causal attention over a window of that length."""
    layer, why = fig13_layer(metrics)
    entropy = metrics["head_entropy_by_layer"][layer]
    uniform_entropy = float(np.mean([math.log(t + 1) for t in range(1, window)]))  # rows t >= 1
    rho = metrics["head_entropy_variance_spearman_by_layer"][layer]
    plot_head_entropy([f"H{h}" for h in range(len(entropy))], entropy, metrics["head_output_variance_by_layer"][layer],
                      uniform_entropy, f"Fig. 13: layer {layer} ({why})\nSpearman rho of entropy and variance {rho:+.2f}",
                      path)


def draw_emergence(metrics, run):
    if metrics["emergence"] is not None:
        result = metrics["emergence"]["softmax"][str(run.seed)]
        plot_emergence({run.subject: [result]}, {run.subject: "tab:red"},
                       f"The chain as it grows: {run.subject}, seed {run.seed}", run.path("fig_emergence.png"))


def draw(metrics, row_taus, run, window):
    plot_variance(metrics, run.path("fig1_variance_by_position.png"))
    plot_attention_and_norm(metrics, run.path("fig3_attention_and_norm.png"))
    plot_wo(metrics, row_taus, run.path("fig7_wo_keeps_variance.png"))
    plot_entropy_and_variance(metrics, window, run.path("fig13_head_entropy_variance.png"))


# ----------------------------------------------------------------------------- report

def report(metrics, subject, vocab_size, window):
    m = metrics
    ratio, reading = m["var_ratio_token0"], m["var_ratio_reading"]
    print(f"{subject}: next-token loss on the held-out windows {m['held_out_loss']:.3f} nats "
          f"(uniform over the {vocab_size} tokens: {math.log(vocab_size):.2f})")
    print(f"{subject}, {m['n_windows']} held-out windows of {window} tokens and {m['n_windows']} random-token windows; "
          f"layer-0 head outputs, variance at position 0 vs mean at t >= 1")
    rows = []
    for case in ratio:
        within, across = m[f"var_by_position_{case}"]["within_token"], m[f"var_by_position_{case}"]["across_sequences"]
        rows.append([case, within[0], float(np.mean(within[1:])), ratio[case], across[0], float(np.mean(across[1:]))])
    print_table(rows, ["case", "within tok 0", "t >= 1", "ratio", "across seq 0", "t >= 1"])
    outliers = [case for case in ratio if ratio[case] > 1]
    print(f"(the ratio uses the {reading.replace('_', ' ')} reading"
          + ("; with BOS, token 0's across-sequences variance is 0)\n" if reading == "within_token" else ")\n")
          + f"{subject}: token 0 is the high-variance outlier (ratio > 1) in: {', '.join(outliers) or 'no case'}"
          + ("" if len(outliers) == len(ratio) else
             f"; not in: {', '.join(c for c in ratio if c not in outliers)} (the paper's claim does not hold there)")
          + "\n")
    norm0, norm_others = m["first_token_norm_by_layer"], m["other_token_norm_by_layer"]
    taus, taus_across = m["wo_kendall_tau_by_layer"], m["wo_kendall_tau_across_windows_by_layer"]
    post_ratio = m["post_wo_var_ratio_by_layer"]
    rho, layers = m["head_entropy_variance_spearman_by_layer"], range(len(norm0))
    print_table([[i, m["first_token_attention_by_layer"][i], m["sink_rate_by_layer"][i], norm0[i], norm_others[i],
                  norm0[i] / norm_others[i], taus[i], taus_across[i], m["wo_row_kendall_tau_mean_by_layer"][i],
                  post_ratio[i], rho[i]] for i in layers],
                ["layer", "attn to 0", "sink rate", "norm 0", "norm others", "0/others",
                 "W_O tau within", "across", "row tau mean", "var ratio after W_O", "rho(entropy, var)"])
    spike, sink = m["spike_layer"], m["sink_layer"]
    print(f"\n{subject}: Gu et al.'s sink rate (heads and windows whose attention to token 0 is above {SINK_THRESHOLD}) "
          f"{m['sink_rate']:.3g} over all layers; first layer where token 0's norm reaches {SPIKE_NORM_RATIO:g}x the "
          f"others': {'none in this model' if spike is None else spike}; first sink layer (sink rate >= "
          f"{SINK_LAYER_SHARE}): {'none in this model' if sink is None else sink}; the sink "
          + ("follows the spike (same layer or the next), as in the paper" if m["sink_follows_spike"] else
             "does not follow the spike within one layer here"))
    print(f"{subject}, W_O: tau > 0 (W_O weighs token 0's high-spread dimensions more) in layers "
          f"{[i for i in layers if taus[i] > 0] or 'none'} within token 0, "
          f"{[i for i in layers if taus_across[i] > 0] or 'none'} across windows (the paper's reading; "
          f"Llama-2: 0.32); token 0's variance stays above the others' after W_O in layers "
          f"{[i for i in layers if post_ratio[i] > 1] or 'none'}")
    shown, why = fig13_layer(m)
    print(f"{subject}, Fig. 13: Spearman rho of head entropy and output variance in layer {shown} ({why}) "
          f"{rho[shown]:+.2f} (paper: negative, low-entropy heads give high-variance outputs); negative in layers "
          f"{[i for i in layers if rho[i] < 0] or 'none'}")


def report_emergence(metrics, run, cost):
    """The chain as it grew, one short section; one line where there are no snapshots."""
    if metrics["emergence"] is None:
        print(f"\n{run.subject}: no snapshots to follow the chain through training "
              + ("(a pretrained model)" if run.pretrained is not None else "(--snapshots 0)"))
        return
    result = metrics["emergence"]["softmax"][str(run.seed)]
    print_link_bars()
    print_emergence_table(f"{run.subject}, seed {run.seed}", result)
    print(order_text(f"{run.subject}, seed {run.seed}", result))
    print(f"{run.subject}: {cost_text([cost])} (fig_emergence.png)")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = script_parser(__doc__).parse_args(argv)
    run = setup(args, __file__, argv=argv)
    model, x, bos = studied_model(run, N_WINDOWS)  # x: (N, T) held-out windows
    vocabulary = 256 if run.model == "trained" else model.config.vocab_size  # bytes, or the pretrained vocabulary
    x_random = random_token_windows(len(x), x.shape[1], bos, torch.Generator().manual_seed(run.seed + 1),
                                    vocabulary).to(run.device)  # (N, T)
    metrics = {"n_windows": len(x), **variance_discrepancy(model, x, x_random, bos, run.seed)}
    logits, cache = model.run_with_cache(x, record=LAYER_HOOKS)  # the trained model on text, every layer
    layers = range(model.config.n_layer)
    metrics |= {**held_out_loss(logits, x), **sink_and_norm(cache, layers), **wo_keeps_variance(model, cache, layers),
                **entropy_and_variance(cache, layers)}
    metrics["emergence"], cost = chain_over_training(run, x, bos)
    row_taus = metrics.pop("wo_row_kendall_taus_by_layer")  # Fig. 7's boxes, too long for metrics.json
    metrics = write_metrics(metrics, run)
    draw(metrics, row_taus, run, x.shape[1])
    draw_emergence(metrics, run)
    report(metrics, run.subject, model.config.vocab_size, x.shape[1])
    report_emergence(metrics, run, cost)
    return metrics


if __name__ == "__main__":
    run_script(main)

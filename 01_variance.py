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
    token 0's residual stream entering the block beside the others' mean (Fig. 3);
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
     BOS token that 05 uses; it trains in 6 to 10 minutes). Why is
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
     "init_random_tokens" to `by_case`: the random-init model on the random-token windows
     `x_random` (its metrics key is then `var_by_position_init_random_tokens`). Predict the
     across-sequences variance at position 0 over its mean at t >= 1 for that case, run, and
     compare with exercise 3: random bytes do not repeat the way text does.
"""
import matplotlib

matplotlib.use("Agg")
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from cli import (N_WINDOWS, layer_ticks, plot_head_entropy, print_table, run_script, save_figure, script_parser, setup,
                 studied_model, write_metrics)
from data import random_token_windows
from measures import (SINK_THRESHOLD, SPIKE_NORM_RATIO, attention_entropy_by_head, first_token_attention,
                      head_output_variance, norm_spike_layer, rank_correlation, row_normalized, sink_rate,
                      variance_by_position)
from model import GPT

CASE_TITLES = {"init": "random init, text", "trained": "trained, text", "random_tokens": "trained, random tokens"}


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


def variance_ratio_token0(variance):
    """(T,) variance per position -> variance at position 0 over the mean at positions >= 1."""
    return float(variance[0] / variance[1:].mean().clamp_min(1e-30))


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


def layer0_variance(model, x, device):
    """{"across_sequences": [...], "within_token": [...]} of layer 0's head outputs on windows x.
    o_t = sum_{s <= t} A_ts v_s: token 0's output is v_0 alone, and uniform attention over
    t + 1 independent values gives var(o_t) = var(v) / (t + 1) (paper §3)."""
    with torch.no_grad(), model.hooks(record="blocks.0.attn.hook_head_out") as cache:
        model(x.to(device))
    across, within = variance_by_position(cache["blocks.0.attn.hook_head_out"])  # (T,) each
    return {"across_sequences": across.tolist(), "within_token": within.tolist()}


def first_layer(values, threshold):
    """The first index whose value reaches threshold, or None."""
    return next((i for i, v in enumerate(values) if v >= threshold), None)


def sink_follows_spike(spike, sink):
    """The paper's order (Fig. 3): the sink starts in the layer of the norm spike or the next, never before."""
    return spike is not None and sink is not None and spike <= sink <= spike + 1


# ----------------------------------------------------------------------------- figures

def plot_variance(by_case, path):
    fig, axes = plt.subplots(1, len(by_case), figsize=(4.7 * len(by_case), 4), squeeze=False)
    for ax, (case, variance) in zip(axes[0], by_case.items()):
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


def plot_attention_and_norm(layers, attention, norm0, norm_others, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, attention, "o-", color="tab:red", label="attention to token 0")
    ax.axhline(SINK_THRESHOLD, color="tab:red", linewidth=0.5, linestyle=":")
    ax.set(xlabel="layer (residual stream entering the block)", ylabel="mean attention to token 0", ylim=(0, 1),
           xticks=layer_ticks(layers), title="Fig. 3: first-token attention and input norm")
    ax.yaxis.label.set_color("tab:red")
    twin = ax.twinx()
    twin.plot(layers, norm0, "s-", color="tab:blue", label="token 0 input L2 norm")
    twin.plot(layers, norm_others, "^--", color="tab:cyan", label="tokens t ≥ 1 (mean)")
    twin.set_ylabel("input L2 norm", color="tab:blue")
    twin.set_ylim(0, None)
    lines = ax.get_lines()[:1] + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    save_figure(fig, path)


def plot_wo(layers, taus, taus_across, row_taus, post_ratio, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot(row_taus, positions=layers, widths=0.5, manage_ticks=False)  # else its labels outlive xticks below
    left.scatter(layers, taus, marker="D", color="tab:blue", zorder=3, label="|W_O column| vs spread within token 0")
    left.scatter(layers, taus_across, marker="o", color="tab:green", zorder=3,
                 label="|W_O column| vs variance across windows")
    left.axhline(0, color="black", linewidth=0.5)
    left.set(xlabel="layer", ylabel="Kendall tau-b with token 0's dimensions", xticks=layer_ticks(layers),
             ylim=(-1, 1), title="Fig. 7: W_O weights vs token 0's variance")
    left.legend(fontsize=8, title="box: one tau per W_O row", title_fontsize=8)
    right.plot(layers, post_ratio, "o-", color="tab:red")
    right.axhline(1, color="gray", linestyle=":", label="no discrepancy")
    right.set(xlabel="layer", ylabel="token 0 variance / others' after W_O", xticks=layer_ticks(layers), yscale="log",
              title="Fig. 7: variance ratio after W_O")
    right.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    args = setup(parser.parse_args(argv), __file__)
    model, x, bos = studied_model(args, N_WINDOWS)  # x: (N, T) held-out windows
    model_cfg = model.config
    torch.manual_seed(args.seed)  # the random initialisation below (Fig. 1, "init")
    vocabulary = 256 if args.model == "trained" else model_cfg.vocab_size  # bytes, or the pretrained vocabulary
    x_random = random_token_windows(len(x), x.shape[1], bos, torch.Generator().manual_seed(args.seed + 1),
                                    vocabulary).to(args.device)  # (N, T)
    # With BOS, token 0 is the same in every window: its variance across windows is 0 by construction,
    # so the ratio reads the variance within a token; without BOS, the paper's reading, across windows.
    reading = "within_token" if bos else "across_sequences"

    # Fig. 1: the variance of layer 0's head outputs by position, three cases.
    by_case = {"init": layer0_variance(random_init_like(model), x, args.device),  # freed after its one pass
               "trained": layer0_variance(model, x, args.device),
               "random_tokens": layer0_variance(model, x_random, args.device)}
    ratio = {case: variance_ratio_token0(torch.tensor(v[reading])) for case, v in by_case.items()}

    # Fig. 3, 7 and 13: layer by layer, on the trained model and text.
    names = ["blocks.*.hook_resid_in", "blocks.*.attn.hook_pattern", "blocks.*.attn.hook_head_out",
             "blocks.*.attn.hook_head_out_post", "blocks.*.attn.hook_out"]
    with torch.no_grad(), model.hooks(record=names) as cache:
        logits, _ = model(x)
    loss = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()))  # next-token loss, held out
    layers = list(range(model_cfg.n_layer))
    by_head = [first_token_attention(cache[f"blocks.{i}.attn.hook_pattern"]) for i in layers]  # (H,) each
    attention = [float(heads.mean()) for heads in by_head]
    heads_over = [float((heads > SINK_THRESHOLD).float().mean()) for heads in by_head]  # Gu et al.'s sink rate
    norms = [cache[f"blocks.{i}.hook_resid_in"].norm(dim=-1) for i in layers]  # each (N, T)
    norm0, norm_others = [float(n[:, 0].mean()) for n in norms], [float(n[:, 1:].mean()) for n in norms]
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
    entropy = [attention_entropy_by_head(row_normalized(cache[f"blocks.{i}.attn.hook_pattern"])) for i in layers]
    head_variance = [head_output_variance(cache[f"blocks.{i}.attn.hook_head_out"]) for i in layers]  # (H,) each
    rho = [rank_correlation(e.numpy(), v.numpy()) for e, v in zip(entropy, head_variance)]  # Fig. 13, per layer

    metrics = {
        "n_windows": len(x),
        **{f"var_by_position_{case}": variance for case, variance in by_case.items()},
        "var_ratio_token0": ratio,
        "var_ratio_reading": reading,
        "held_out_loss": loss,
        "first_token_attention_by_layer": attention,
        "heads_over_threshold_by_layer": heads_over,
        "first_token_norm_by_layer": norm0,
        "other_token_norm_by_layer": norm_others,
        "wo_kendall_tau_by_layer": taus,
        "wo_kendall_tau_across_windows_by_layer": taus_across,
        "wo_row_kendall_tau_mean_by_layer": [float(np.mean(t)) for t in row_taus],
        "post_wo_var_ratio_by_layer": post_ratio,
        "sink_rate_by_layer": sink_rate([cache[f"blocks.{i}.attn.hook_pattern"] for i in layers])[0],
        "sink_rate": sink_rate([cache[f"blocks.{i}.attn.hook_pattern"] for i in layers])[1],
        "spike_layer": norm_spike_layer(norm0, norm_others),
        "sink_layer": first_layer(attention, SINK_THRESHOLD),
        "head_entropy_by_layer": [e.tolist() for e in entropy],
        "head_output_variance_by_layer": [v.tolist() for v in head_variance],
        "head_entropy_variance_spearman_by_layer": rho,
    }
    metrics["sink_follows_spike"] = sink_follows_spike(metrics["spike_layer"], metrics["sink_layer"])
    write_metrics(metrics, args.script_dir)
    plot_variance(by_case, os.path.join(args.script_dir, "fig1_variance_by_position.png"))
    plot_attention_and_norm(layers, attention, norm0, norm_others,
                            os.path.join(args.script_dir, "fig3_attention_and_norm.png"))
    plot_wo(layers, taus, taus_across, row_taus, post_ratio,
            os.path.join(args.script_dir, "fig7_wo_keeps_variance.png"))
    sink = metrics["sink_layer"]
    shown = sink if sink is not None else int(np.argmax(attention))  # Fig. 13's layer
    why = "the first sink layer" if sink is not None else "no sink: most attention to token 0"
    uniform_entropy = float(np.mean([math.log(t + 1) for t in range(1, x.shape[1])]))  # rows t >= 1, uniform
    plot_head_entropy([f"H{h}" for h in range(len(entropy[shown]))], entropy[shown], head_variance[shown],
                      uniform_entropy, f"Fig. 13: layer {shown} ({why})\nSpearman rho of entropy and variance {rho[shown]:+.2f}",
                      os.path.join(args.script_dir, "fig13_head_entropy_variance.png"))

    print(f"{args.subject}: next-token loss on the held-out windows {loss:.3f} nats "
          f"(uniform over the {model_cfg.vocab_size} tokens: {math.log(model_cfg.vocab_size):.2f})")
    print(f"{args.subject}, {len(x)} held-out windows of {x.shape[1]} tokens and {len(x)} random-token windows; "
          f"layer-0 head outputs, variance at position 0 vs mean at t >= 1")
    rows = []
    for case, variance in by_case.items():
        within, across = variance["within_token"], variance["across_sequences"]
        rows.append([case, within[0], float(np.mean(within[1:])), ratio[case], across[0], float(np.mean(across[1:]))])
    print_table(rows, ["case", "within tok 0", "t >= 1", "ratio", "across seq 0", "t >= 1"])
    outliers = [case for case in by_case if ratio[case] > 1]
    print(f"(the ratio uses the {reading.replace('_', ' ')} reading"
          + ("; with BOS, token 0's across-sequences variance is 0)\n" if bos else ")\n")
          + f"{args.subject}: token 0 is the high-variance outlier (ratio > 1) in: {', '.join(outliers) or 'no case'}"
          + ("" if len(outliers) == len(by_case) else
             f"; not in: {', '.join(c for c in by_case if c not in outliers)} (the paper's claim does not hold there)")
          + "\n")
    norm_ratio = [a / b for a, b in zip(norm0, norm_others)]
    row_tau_mean = metrics["wo_row_kendall_tau_mean_by_layer"]
    print_table([[i, attention[i], heads_over[i], norm0[i], norm_others[i], norm_ratio[i], taus[i], taus_across[i],
                  row_tau_mean[i], post_ratio[i], rho[i]] for i in layers],
                ["layer", "attn to 0", f"heads > {SINK_THRESHOLD}", "norm 0", "norm others", "0/others",
                 "W_O tau within", "across", "row tau mean", "var ratio after W_O", "rho(entropy, var)"])
    spike = metrics["spike_layer"]
    print(f"\n{args.subject}: first layer where token 0's norm reaches {SPIKE_NORM_RATIO:g}x the others': "
          f"{'none in this model' if spike is None else spike}; first layer with attention to token 0 >= "
          f"{SINK_THRESHOLD}: {'none in this model' if sink is None else sink}; the sink "
          + ("follows the spike (same layer or the next), as in the paper" if metrics["sink_follows_spike"] else
             "does not follow the spike within one layer here"))
    kept = [i for i in layers if post_ratio[i] > 1]
    print(f"{args.subject}, W_O: tau > 0 (W_O weighs token 0's high-spread dimensions more) in layers "
          f"{[i for i in layers if taus[i] > 0] or 'none'} within token 0, "
          f"{[i for i in layers if taus_across[i] > 0] or 'none'} across windows (the paper's reading; "
          f"Llama-2: 0.32); token 0's variance stays above the others' after W_O in layers {kept or 'none'}")
    print(f"{args.subject}, Fig. 13: Spearman rho of head entropy and output variance in layer {shown} ({why}) "
          f"{rho[shown]:+.2f} (paper: negative, low-entropy heads give high-variance outputs); negative in layers "
          f"{[i for i in layers if rho[i] < 0] or 'none'}")
    return metrics


if __name__ == "__main__":
    run_script(main)

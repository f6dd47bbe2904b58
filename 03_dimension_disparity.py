"""
03 - Dimension disparity and QK locking (paper §4.3; Fig. 11, 12, 15, 21).

Claim. The super neurons of the early FFNs write token 0's massive activation into a handful
of residual dimensions, so token 0's hidden state is dominated by a few outlier dimensions:
its dominance ratio max|x_i| / mean|x_i| rises sharply in the early layers (Fig. 11; about
263 after RMSNorm in Llama-2 layer 2) while the other tokens' stays low. RMSNorm then maps
token 0's state to an almost fixed direction whatever the sequence ("directional filter"),
so its key is almost the same in every sequence; heads whose query matrix has its principal
direction along that sink key give token 0 a positive score for almost every query
("QK locking", Fig. 12). The outlier dimensions also collapse the hidden states onto a few
directions: the effective rank drops in the first layers (Fig. 15, 21).

What this script measures, on 64 held-out windows (16 for a pretrained model):
  - the dominance ratio per layer, token 0 against the mean over the others (Fig. 11),
    measured where the paper measures it: after the block's RMSNorm, gain included
    (blocks.{i}.hook_attn_in, what the attention reads);
  - the mean cosine similarity between token 0's RMS-normalised attention inputs taken from
    different windows, against the same at the other positions. Without BOS token 0 is a
    different token in every window, so "whatever the input" means something. With a BOS
    token (the cpu_bos profile) its state would be identical and the cosine 1 by
    construction; the measure then uses 64 windows whose first token is text;
  - in the first layer whose input carries token 0's norm spike (token 0's L2 norm at least
    2x the others'; without one, the layer with the largest ratio), per head: |cos| between
    the sink key and W_Q's principal direction, and the share of queries scoring token 0
    positively (Fig. 12);
  - the effective rank (Roy & Vetterli 2007) of each window's (T, C) hidden states per layer,
    averaged over windows (Fig. 15, 21).
"Layer i" is the residual stream entering block i, as in 01. A small model may not show the
disparity; the script prints its numbers and says so.

Run:  python 03_dimension_disparity.py [--quick] [--model smollm2-135m]
      (figures and metrics.json in out/03_dimension_disparity/, or out/03_dimension_disparity/<model>/)

Exercises (cpu profile; each takes minutes once the model is cached)
  1. Reading. `dominance_ratio` (measures.py) divides by the mean |x_i| over C = n_embd
     dimensions. What is the largest value it can take, and for which vector? Check that no
     entry of `dominance_ratio_token0_by_layer` exceeds it.
  2. Predicting. With `--profile cpu_bos` (a BOS token at position 0) the direction cosines
     are measured on windows whose first token is text. What would
     `token0_direction_cosine_by_layer` be on the BOS windows `x` themselves? Add a flag
     `--direction_on_bos` that passes `x` to `direction_cosines` instead, run it with
     `--profile cpu_bos`, and compare.
  3. Predicting. The sink key is the same in every window, but the queries are rotated by
     RoPE. Predict whether a head with `qk_alignment_by_head` near 1 must have a
     `positive_score_ratio_by_head` near 0 or 1, then look at the printed head table.
  4. Changing code. Leave token 0 out of `effective_rank_by_layer` (in `effective_ranks`, pass
     `r[:, 1:]`) and compare `effective_rank_by_layer` with and without it: in which layers does token 0
     alone pull the rank down?
"""
import numpy as np
import torch
import torch.nn.functional as F

from cli import (N_WINDOWS, layer_ticks, print_table, run_script, save_figure, script_parser, setup, studied_model,
                 write_metrics)
import matplotlib.pyplot as plt  # after cli, which chooses matplotlib's file-only backend
from measures import (SPIKE_NORM_RATIO, dominance_ratio, mean_effective_rank, mean_pairwise_cosine, spike_or_largest_ratio,
                      token0_norms)

HOOKS = ["blocks.*.hook_resid_in", "blocks.*.hook_attn_in", "blocks.*.attn.hook_q", "blocks.*.attn.hook_k"]


# ----------------------------------------------------------------------------- measures

def qk_locking_by_head(w_query, q, k):
    """Per head: (|cos| between the sink key and W_Q's principal direction, share of queries t >= 1 whose
    score to token 0 is positive).

    w_query: W_Q (H * hd, C), head h's rows h * hd .. (h + 1) * hd - 1; q, k: the recorded queries and keys
    (N, H, T, hd), after RoPE.
    RoPE: the alignment compares weights and the sink key in the un-rotated frame. Key 0 sits
    at position 0, where RoPE's angle is 0, so the recorded key is also the un-rotated one;
    the rotation each query gets is left out there. The positive-score share uses the
    recorded, rotated q and k, so it is the model's actual sign of q_t . k_0."""
    alignment, positive = [], []
    for h, w_head in enumerate(w_query.split(q.shape[-1])):  # (hd, C): W_Q of head h
        principal = torch.linalg.svd(w_head, full_matrices=False).U[:, 0]  # (hd,): where W_Q sends inputs most
        sink_key = k[:, h, 0].mean(0)  # (hd,): token 0's key, averaged over windows
        alignment.append(float(F.cosine_similarity(principal, sink_key, dim=0).abs()))
        scores = torch.einsum("ntd,nd->nt", q[:, h, 1:], k[:, h, 0])  # (N, T-1): q_t . k_0
        positive.append(float((scores > 0).float().mean()))
    return alignment, positive


# ----------------------------------------------------------------------------- the paper's steps

def dimension_disparity(cache, layers):
    """Fig. 11, per layer: token 0's dominance ratio against the mean over the others, measured where the paper
    measures it, after the block's RMSNorm (gain included)."""
    dominance = [dominance_ratio(cache[f"blocks.{i}.hook_attn_in"]) for i in layers]  # (N, T) each
    return {"dominance_ratio_token0_by_layer": [float(d[:, 0].mean()) for d in dominance],
            "dominance_ratio_others_by_layer": [float(d[:, 1:].mean()) for d in dominance]}


def norm_spike(cache, layers):
    """Token 0's L2 norm over the others' per layer, and the layer QK locking is read in: the first whose input
    has the norm spike, or without one the layer of the largest ratio."""
    norms = [token0_norms(cache[f"blocks.{i}.hook_resid_in"]) for i in layers]  # (token 0's, the others') each
    layer, rule = spike_or_largest_ratio(norms)
    return {"token0_norm_ratio_by_layer": [a / b for a, b in norms], "spike_layer": layer, "spike_layer_rule": rule}


def direction_cosines(model, x):
    """§4.3's directional filter, per layer: the mean pairwise cosine of the attention input attn_norm(resid_in)
    at one position, taken from the different windows of x (N, T), at token 0 and (mean) at t >= 1."""
    _, cache = model.run_with_cache(x, record="blocks.*.hook_attn_in")
    cosines = [mean_pairwise_cosine(cache[f"blocks.{i}.hook_attn_in"]) for i in range(len(model.blocks))]  # (T,) each
    return {"token0_direction_cosine_by_layer": [float(c[0]) for c in cosines],
            "others_direction_cosine_by_layer": [float(c[1:].mean()) for c in cosines]}


def qk_locking(model, cache, layer):
    """Fig. 12 in `layer`, per head: how well W_Q's principal direction aligns with the sink key, and how often
    a query scores token 0 positively."""
    w_query = model.blocks[layer].attn.qkv.weight[:model.config.n_embd].detach().float().cpu()  # (C, C): W_Q
    alignment, positive = qk_locking_by_head(w_query, cache[f"blocks.{layer}.attn.hook_q"],
                                             cache[f"blocks.{layer}.attn.hook_k"])
    return {"qk_alignment_by_head": alignment, "positive_score_ratio_by_head": positive}


def effective_ranks(cache, layers):
    """Fig. 15 / 21, per layer: the effective rank of each window's (T, C) residual stream, averaged over windows."""
    resid = [cache[f"blocks.{i}.hook_resid_in"] for i in layers]  # (N, T, C) each
    return {"effective_rank_by_layer": [mean_effective_rank(r) for r in resid]}


# ----------------------------------------------------------------------------- figures

def plot_dominance(layers, token0, others, cos0, cos_others, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(layers, token0, "o-", color="tab:red", label="token 0")
    left.plot(layers, others, "s-", color="tab:blue", label="tokens t ≥ 1 (mean)")
    left.set(ylim=(0, None), xlabel="layer (block input, after its RMSNorm)", ylabel="dominance ratio max|x| / mean|x|",
             title="Fig. 11: dimension disparity", xticks=layer_ticks(layers))
    left.legend()
    right.plot(layers, cos0, "o-", color="tab:red", label="token 0 (a different token in each window)")
    right.plot(layers, cos_others, "s-", color="tab:blue", label="tokens t ≥ 1 (mean)")
    right.set(ylim=(-0.05, 1.05), xlabel="layer", ylabel="mean cosine between windows",
              title="§4.3: RMSNorm as a directional filter", xticks=layer_ticks(layers))
    right.legend()
    save_figure(fig, path)


def plot_qk_locking(alignment, positive, layer, path):
    heads = np.arange(len(alignment))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(heads, alignment, color="tab:blue", alpha=0.7)
    ax.set(xlabel="head", ylabel="|cos(sink key, W_Q principal direction)|", ylim=(0, 1), xticks=heads,
           title=f"Fig. 12: QK locking in layer {layer}")
    twin = ax.twinx()
    twin.plot(heads, positive, "o-", color="tab:red")
    twin.set_ylabel("share of queries with q . k_0 > 0", color="tab:red")
    twin.set_ylim(0, 1)
    save_figure(fig, path)


def plot_effective_rank(layers, ranks, n_embd, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, ranks, "o-")
    ax.axhline(n_embd, color="gray", linestyle=":", label=f"n_embd = {n_embd}")
    ax.set(xlabel="layer (residual stream entering the block)", ylabel="effective rank of (T, C) hidden states",
           title="Fig. 15 / 21: effective rank by layer", xticks=layer_ticks(layers), ylim=(0, n_embd * 1.05))
    ax.legend()
    save_figure(fig, path)


def draw(metrics, run, n_embd):
    m, layers = metrics, list(range(len(metrics["effective_rank_by_layer"])))
    plot_dominance(layers, m["dominance_ratio_token0_by_layer"], m["dominance_ratio_others_by_layer"],
                   m["token0_direction_cosine_by_layer"], m["others_direction_cosine_by_layer"],
                   run.path("fig11_dominance_ratio.png"))
    plot_qk_locking(m["qk_alignment_by_head"], m["positive_score_ratio_by_head"], m["spike_layer"],
                    run.path("fig12_qk_locking.png"))
    plot_effective_rank(layers, m["effective_rank_by_layer"], n_embd, run.path("fig15_effective_rank.png"))


# ----------------------------------------------------------------------------- report

def report(metrics, subject, window, head_dim, bos):
    m = metrics
    dominance0, others = m["dominance_ratio_token0_by_layer"], m["dominance_ratio_others_by_layer"]
    print(f"{subject}, {m['n_windows']} held-out windows of {window} tokens"
          + (f" (direction cosines: {m['n_windows']} windows whose first token is text)" if bos else ""))
    print_table([[i, m["token0_norm_ratio_by_layer"][i], dominance0[i], others[i], dominance0[i] / others[i],
                  m["token0_direction_cosine_by_layer"][i], m["others_direction_cosine_by_layer"][i],
                  m["effective_rank_by_layer"][i]] for i in range(len(dominance0))],
                ["layer", "norm 0/others", "dominance 0", "others", "0/others", "cos 0", "cos others", "eff. rank"])
    chance = float(np.sqrt(2 / (np.pi * head_dim)))  # E|cos| of random directions in hd dims
    spiked = m["spike_layer_rule"] == "the first norm spike"
    print(f"\n{subject}, QK locking in layer {m['spike_layer']} (first layer whose input has token 0's norm >= "
          f"{SPIKE_NORM_RATIO:g}x the others'{'' if spiked else '; none has, so the largest ratio'}); "
          f"|cos| of random directions ~ {chance:.2f}")
    print_table([[h, a, p] for h, (a, p) in enumerate(zip(m["qk_alignment_by_head"], m["positive_score_ratio_by_head"]))],
                ["head", "alignment", "q.k0 > 0"])
    best = int(np.argmax([a / b for a, b in zip(dominance0, others)]))
    best_ratio = dominance0[best] / others[best]
    print(f"\n{subject}: token 0's dominance ratio after RMSNorm is at most {best_ratio:.1f}x the others' (layer {best}): "
          + ("dimension disparity." if best_ratio >= 10 else
             "below 10x, so this model shows no clear dimension disparity (Llama-2: about 263 at layer 2)."))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = script_parser(__doc__).parse_args(argv)
    run = setup(args, __file__, argv=argv)
    model, x, bos = studied_model(run, N_WINDOWS)  # x: (N, T) held-out windows
    # With BOS, token 0 is the same in every window and its direction trivially fixed: measure it on windows
    # whose first token is text. Without BOS, x's first tokens already vary.
    x_text_first = run.dataset.windows("val", len(x), False, torch.Generator().manual_seed(run.seed + 1))[0] if bos else x
    _, cache = model.run_with_cache(x, record=HOOKS)
    layers = range(model.config.n_layer)
    metrics = {"n_windows": len(x), **dimension_disparity(cache, layers), **norm_spike(cache, layers),
               **direction_cosines(model, x_text_first.to(run.device))}
    metrics |= {**qk_locking(model, cache, metrics["spike_layer"]), **effective_ranks(cache, layers)}
    metrics = write_metrics(metrics, run)
    draw(metrics, run, model.config.n_embd)
    report(metrics, run.subject, x.shape[1], model.blocks[0].attn.head_dim, bos)
    return metrics


if __name__ == "__main__":
    run_script(main)

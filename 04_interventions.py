"""
04 - Create a sink anywhere: mask intervention and variance amplification (paper §4.4; Fig. 5, 6, 19, 20).

Claim. Token 0 is a sink because it cannot aggregate: it attends only to itself, so its head
output is one value vector with a large variance, not an average. Give any token k the same
property and it becomes a sink too:
  - Mask intervention (Fig. 5, 19). Token k may attend only to itself. The attention each
    position receives (mean over the later queries t > j) then peaks at k. The chain at k:
    the FFN unit that fires on token 0 (found by its activations) fires at k too.
  - Variance amplification (Fig. 6, 20). Push token k's head outputs away from their mean,
    mu + lambda (x_k - mu), for lambda in 1..32: attention to k grows with lambda. A control
    that gives x_k the same norm without that variance makes no sink: variance, not norm.

The main reading of the amplification. The paper's chain starts at the aggregation output that
feeds the first FFN unit firing on token 0 (the token-0 unit, found by its activations as in
02). That unit reads the attention output of its own block and of every block before it, and
nothing later; so the main reading edits the input of W_O (hook_head_out_post: in the softmax
models 04 studies, the head outputs o_{t,h} themselves) in layers 0 up to the unit's layer
(--amplify_layers overrides), with mu = x_k's mean over the windows, per head and dimension: the
variance across sequences of 01 and of the paper's Fig. 1, the one token 0 has by position.
Editing every layer would also rewrite the late layers' keys and values, where token 0's
variance plays no part. Two controls give x_k the same norm:
  - scale: x_k times a scalar (per window and head). This keeps its direction, but it also
    multiplies its variance across windows by the scalar squared;
  - shift: x_k plus one vector along its mean direction, the same in every window. This leaves
    the variance across windows exactly unchanged.
The other readings are printed beside it at the largest lambda: the edit in layer 0 only and
in all layers, and mu over the window's positions instead of over windows.

The authors' reading (their notebook, attention_sink.ipynb), printed beside the main one and drawn
as they draw Fig. 6: mu^(l) is layer l's mean value vector (hook_v) over about 50,000 random
tokens; the edit acts on the input of W_O in every layer l below L_obs, and the score is the
attention to k at layer L_obs alone (mean over heads and queries t > k), for lambda in 1..30.
L_obs is the first sink layer as 01 finds it (Gu et al.'s sink rate at least 0.5), from layer 1 on
(there must be a layer below it); without a sink layer, the layer of the most attention to token 0;
--observe_layer overrides. The controls run the same way. The verdict uses the main reading.

Setup: 64 held-out windows (16 for a pretrained model); k = 10 (or the middle of a shorter
window) from --k. The mask acts in layers --from_layer .. last (default 0). An edit at the
output of layer i can only change the keys of layers after it, so attention to k is averaged
over heads and the layers after the first edited one. The super neuron is the FFN unit of the
early layers with the largest W_gate / W_up row-norm z-score (as in 02). A small model may show
none of this; the script prints its numbers and says so. Each pass is reduced as it runs to what
the script prints (attention received per position, entropy, ...): no (N, H, T, T) pattern
outlives its layer, and a pass stops after the last block it reads.

Run:  python 04_interventions.py [--quick] [--model smollm2-135m] [--k 10] [--from_layer 0] [--amplify_layers 0-1]
            [--observe_layer 3]
      (figures and metrics.json in out/04_interventions/, or out/04_interventions/<model>/)

Exercises (cpu profile; each takes minutes once the model is cached)
  1. Reading. `amplified`, `scale_control` and `shift_control` leave every tensor unchanged at
     lambda = 1. Which entry of `attention_received_baseline` must `attention_to_k_variance[0]`
     then equal? Check it in metrics.json.
  2. Predicting. Before running `python 04_interventions.py --k 20`, predict where the sink
     of the masked model goes; check `attention_received_masked` and `sink_moved_to_k`.
  3. Predicting. By how much does `scale_control` multiply the variance of x_k across windows
     when it multiplies every x_k by the same c? And `shift_control`? Which control then
     separates variance from norm more cleanly? Compare `attention_to_k_scale_control` and
     `attention_to_k_shift_control`, and their columns in the printed table.
  4. Changing code. Sun et al.'s mean ablation: add a flag `--mean_ablate` that, right
     after `find_super_neuron`, replaces the super neuron's column of W_down
     (`model.blocks[layer].mlp.w_down.weight[:, unit]`) by its mean. Predict, then watch,
     the sink at token 0: `attention_received_baseline[0]`.
"""
import math
from functools import partial

import numpy as np
import torch

from cli import N_WINDOWS, print_table, run_script, save_figure, script_parser, setup, studied_model, write_metrics
import matplotlib.pyplot as plt  # after cli, which chooses matplotlib's file-only backend
from data import random_token_windows
from measures import (MASK_GAIN, MIN_LATER_QUERIES, SINK_THRESHOLD, attention_received, default_k, dominance_ratio,
                      early_layers, first_sink_layer, layer_mean, mask_passes, row_norm_zscores, super_neuron_record,
                      unit_with_largest_row_norms)
from model import InputError

LAMBDAS = (1, 2, 4, 8, 16, 32)
AUTHORS_LAMBDAS = (1, 2, 5, 10, 15, 20, 25, 30)  # the authors' notebook's
MU_OVER = ("windows", "positions")  # what mu is a mean over (see the docstring); the main reading: windows
VALUES = "values on random tokens"  # the authors' mu: each layer's mean value vector over random tokens
RANDOM_TOKENS = 50_000  # ... over about this many tokens, as in their notebook
BELOW = "below L_obs"  # the authors' reading: the edit in every layer below L_obs, attention read at L_obs alone
EDITED = "hook_head_out_post"  # the input of W_O; in the softmax models 04 studies, the head outputs o_{t,h}
CONTROL_GAIN = 3  # ours: the variance arm gives k at least 3x what either control gives (the paper's controls stay flat)
ARM_COLORS = {"variance": "tab:red", "scale control": "tab:gray", "shift control": "tab:blue"}
PROBED = ("superneuron_activation_at_k", "dominance_ratio_at_k", "rms_ratio_at_k")  # what the main reading also reads


# ----------------------------------------------------------------------------- passes, reduced as they run

def last_block(hooks):
    """The last block that any of these hook names ("blocks.{layer}....") is in: a pass that reads them stops there."""
    return max(int(name.split(".")[1]) for name in hooks)


def residual_at_k(resid, k):
    """The stream entering the last layer (N, T, C) -> its dominance ratio at k, and its RMS at k over the mean RMS."""
    rms = resid.pow(2).mean(-1).sqrt()  # (N, T): what the next RMSNorm divides by
    return {"dominance_ratio_at_k": float(dominance_ratio(resid[:, k]).mean()),
            "rms_ratio_at_k": float(rms[:, k].mean() / rms[:, 1:].mean())}


def probes_at_k(neuron, k, n_layer):
    """What the main reading also reads at k in each of its passes, {hook: function -> {name: number}}: the super
    neuron's activation, and the dominance ratio and RMS of the stream entering the last layer."""
    return {f"blocks.{neuron['layer']}.mlp.hook_hidden":
            lambda hidden: {"superneuron_activation_at_k": float(hidden[:, k, neuron["unit"]].mean())},
            f"blocks.{n_layer - 1}.hook_resid_in": partial(residual_at_k, k=k)}


def value_means(model, x, layers, batch=N_WINDOWS):
    """The authors' mu^(l): each layer's mean value vector (hook_v) over every token of x (N, T), read
    `batch` windows at a time -> {layer: (H, hd)}."""
    hooks = {i: f"blocks.{i}.attn.hook_v" for i in layers}
    sum_over_tokens = {name: lambda v: v.sum(dim=(0, 2)) for name in hooks.values()}  # (B, H, T, hd) -> (H, hd)
    sums = [model.run_with_cache(chunk, reduce=sum_over_tokens, last_layer=last_block(sum_over_tokens))[1]
            for chunk in x.split(batch)]
    return {i: sum(s[name] for s in sums) / x.numel() for i, name in hooks.items()}


def amplified_pass(model, x, k, arm, lam, layers, observed, mu="windows", probes=None):
    """One pass with `arm` editing token k's input of W_O in `layers` (mu: "windows", "positions", or the
    authors' {layer: (H, hd)}) -> {"attention_to_k": mean over heads and the `observed` layers, and what the
    `probes` ({hook: function -> {name: number}}) read in the same pass}."""
    edits = {f"blocks.{i}.attn.{EDITED}": partial(arm, k=k, lam=lam, mu=mu[i] if isinstance(mu, dict) else mu)
             for i in layers}
    patterns = {f"blocks.{i}.attn.hook_pattern": attention_received for i in observed}  # (T,) each
    reduce = {**patterns, **(probes or {})}
    _, out = model.run_with_cache(x, reduce=reduce, last_layer=last_block(reduce), edit=edits)
    received = torch.stack([out[name] for name in patterns]).mean(0)  # (T,)
    readings = {"attention_to_k": float(received[k])}
    for hook in probes or {}:
        readings |= out[hook]
    return readings


def layers_name(layers):
    """[0, 1, 2] -> 'layers 0-2'; [3] -> 'layer 3'."""
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def reading(readings, where, mu):
    """{arm: attention to k by lambda} of the reading named (where, mu)."""
    return {r["arm"]: r["attention_to_k"] for r in readings if (r["where"], r["mu"]) == (where, mu)}


# ----------------------------------------------------------------------------- interventions

def mean_of(head_out, k, mu):
    """The mean that amplification pushes token k's head outputs (B, H, T, hd) away from, (1 or B, H, hd).
    mu "windows": x_k's mean over the B windows, per head and dimension (the across-sequence variance of 01
    and Fig. 1); "positions": the mean over each window's T positions; a tensor (H, hd): that mean itself
    (the authors' mean value vector of the layer)."""
    if torch.is_tensor(mu):
        return mu.to(head_out)
    return head_out[:, :, k].mean(dim=0, keepdim=True) if mu == "windows" else head_out.mean(dim=2)


def amplified(head_out, k, lam, mu="windows"):
    """Token k's head outputs (B, H, T, hd) pushed away from their mean (see mean_of) by lam; the rest unchanged."""
    x_k, mu = head_out[:, :, k], mean_of(head_out, k, mu)  # (B, H, hd), (1 or B, H, hd)
    out = head_out.clone()
    out[:, :, k] = mu + lam * (x_k - mu)  # variance amplification: x_k <- mu + lambda (x_k - mu)
    return out


def scale_control(head_out, k, lam, mu="windows"):
    """Control (a): x_k times the scalar that gives each window's head the norm `amplified` gives it.
    Its direction is kept; its variance across windows grows too, by that scalar squared."""
    x_k = head_out[:, :, k]  # (B, H, hd)
    target_norm = amplified(head_out, k, lam, mu)[:, :, k].norm(dim=-1, keepdim=True)  # (B, H, 1)
    out = head_out.clone()
    out[:, :, k] = x_k * (target_norm / x_k.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return out


def shift_control(head_out, k, lam, mu="windows"):
    """Control (b): x_k + c d, with d the direction of x_k's mean over the windows and c one number
    per head, the same in every window, so the variance across windows does not change at all;
    c gives x_k the mean squared norm over windows that `amplified` gives it."""
    x_k = head_out[:, :, k]  # (B, H, hd)
    target = amplified(head_out, k, lam, mu)[:, :, k].pow(2).sum(-1).mean(0)  # (H,)
    mean = x_k.mean(dim=0)  # (H, hd)
    d = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # mean_b |x_b + c d|^2 = mean_b |x_b|^2 + 2 c |mean| + c^2: the root c >= -|mean| of "= target"
    m, s = mean.norm(dim=-1), x_k.pow(2).sum(-1).mean(0)  # (H,) each
    c = -m + (m ** 2 - s + target).clamp_min(0).sqrt()
    out = head_out.clone()
    out[:, :, k] = x_k + c[None, :, None] * d
    return out


ARMS = {"variance": amplified, "scale control": scale_control, "shift control": shift_control}


# ----------------------------------------------------------------------------- the paper's steps

def find_super_neuron(model, x):
    """The FFN unit of the early layers whose W_gate and W_up rows have the largest norm z-scores (paper
    Fig. 8), described as 02 describes it (measures.super_neuron_record): with Yu et al.'s (2024) cross-check,
    the unit with the largest mean |activation| on token 0 in that layer, and its activation on token 0."""
    mlps = {i: model.blocks[i].mlp for i in early_layers(model.config.n_layer)}
    zscores = {i: row_norm_zscores(mlp.w_gate.weight, mlp.w_up.weight) for i, mlp in mlps.items()}
    layer, unit = unit_with_largest_row_norms(zscores)
    hook = f"blocks.{layer}.mlp.hook_hidden"
    _, cache = model.run_with_cache(x, record=hook, last_layer=layer)
    return super_neuron_record(layer, unit, *zscores[layer], cache[hook])


def mask_intervention(model, x, k, from_layer):
    """Fig. 5: the attention each position receives with and without the mask, averaged over heads and the
    layers whose keys at k the mask reaches (after from_layer); per layer, the entropy of both passes and the
    baseline's attention to token 0 (Gu et al.'s sink rate, the first token's attention)."""
    passes = mask_passes(model, x, k, from_layer)
    baseline, masked, n_layer = passes["baseline"], passes["masked"], model.config.n_layer
    measured = list(range(from_layer + 1, n_layer))
    received_baseline, received_masked = layer_mean(baseline, measured), layer_mean(masked, measured)
    argmax = int(received_masked[1:].argmax()) + 1  # over positions >= 1
    # The paper's reading of Fig. 5: k becomes the peak of attention received, among the positions that at
    # least MIN_LATER_QUERIES later queries see (1 .. T - m), and receives MASK_GAIN times its unmasked share.
    peak = int(layer_mean(masked, measured, "received_seen")[1:].argmax()) + 1
    return {"masked_layers": list(range(from_layer, n_layer)), "measured_layers": measured,
            "attention_received_baseline": received_baseline.tolist(),
            "attention_received_masked": received_masked.tolist(),
            "attention_received_argmax_baseline": int(received_baseline[1:].argmax()) + 1,
            "attention_received_argmax_masked": argmax,
            "sink_moved_to_k": argmax == k and float(received_masked[k]) >= SINK_THRESHOLD,  # stricter: a layer mean
            "mask_peak": peak, "mask_min_later_queries": MIN_LATER_QUERIES,
            "mask_peak_moved_to_k": peak == k and float(received_masked[k]) >= MASK_GAIN * float(received_baseline[k]),
            "mask_heads_over_threshold_on_k": sum(masked[i]["heads_over_threshold_on_k"] for i in measured),
            "mask_heads_measured": len(measured) * model.config.n_head,
            "entropy_by_layer_baseline": [s["entropy"] for s in baseline],
            "entropy_by_layer_masked": [s["entropy"] for s in masked],
            "first_token_attention_by_layer": [s["first_token_attention"] for s in baseline],
            "sink_rate_by_layer": [s["sink_rate"] for s in baseline],
            "token0_unit": passes["token0_unit"]}


def observe_layer(rate_by_layer, first_token_attention_by_layer):
    """L_obs of the authors' reading -> (layer, why): the first sink layer by Gu et al.'s sink rate (each
    layer's, measures.first_sink_layer, as 01 finds it) from layer 1 on, as the reading edits the layers below
    it; without one, the layer of the most attention to token 0 (01's Fig. 13 fallback)."""
    sink = first_sink_layer(rate_by_layer, from_layer=1)
    if sink is not None:
        return sink, "the first sink layer"
    return 1 + int(np.argmax(first_token_attention_by_layer[1:])), "no sink layer: the most attention to token 0"


def random_value_means(model, run, window, bos, layers):
    """The authors' mu^(l) (value_means) over about RANDOM_TOKENS random tokens in windows of `window` tokens
    -> (means, how many tokens)."""
    vocabulary = 256 if run.model == "trained" else model.config.vocab_size  # bytes, or the pretrained vocabulary
    x_random = random_token_windows(math.ceil(RANDOM_TOKENS / window), window, bos,
                                    torch.Generator().manual_seed(run.seed + 1), vocabulary).to(run.device)
    return value_means(model, x_random, layers), x_random.numel()


def amplification_plan(main_layers, n_layer, observe):
    """The readings to take, each dict(where, layers: the edited ones, mu, observed: the layers whose attention
    to k is read, lambdas). Ours edit the main reading's layers, layer 0 or all layers, with mu over windows or
    over positions, and read the layers whose keys at k the edit reaches; all but the main one (mu over windows)
    at the largest lambda only (CPU time). The authors' edits every layer below L_obs with their mu and reads
    L_obs alone."""
    main_where = layers_name(main_layers)
    wheres = {}  # layers -> name, the main reading's first, without repeats
    for where, layers in ((main_where, main_layers), ("layer 0", [0]), ("all layers", list(range(n_layer)))):
        wheres.setdefault(tuple(layers), where)
    ours = [dict(where=where, layers=list(layers), mu=mu, observed=list(range(layers[0] + 1, n_layer)),
                 lambdas=list(LAMBDAS if (where, mu) == (main_where, "windows") else LAMBDAS[-1:]))
            for layers, where in wheres.items() for mu in MU_OVER]
    return ours + [dict(where=BELOW, layers=list(range(observe)), mu=VALUES, observed=[observe],
                        lambdas=list(AUTHORS_LAMBDAS), observe_layer=observe)]


def variance_amplification(model, x, k, plan, main_where, means, probes):
    """Fig. 6: each planned reading under each arm (amplification and its two controls at the input of W_O of
    token k) -> the readings, and the main reading (edit in main_where, mu over windows): its attention to k
    and what its probes read, by arm and lambda."""
    readings, probed = [], {}
    for r in plan:
        is_main = (r["where"], r["mu"]) == (main_where, "windows")
        mu = means if r["mu"] == VALUES else r["mu"]
        for arm, edit in ARMS.items():
            passes = [amplified_pass(model, x, k, edit, lam, r["layers"], r["observed"], mu, probes if is_main else None)
                      for lam in r["lambdas"]]
            readings.append(r | {"arm": arm, "attention_to_k": [p["attention_to_k"] for p in passes]})
            if is_main:
                probed[arm] = passes
    main = reading(readings, main_where, "windows")
    at_top = {arm: attention[-1] for arm, attention in main.items()}  # the largest lambda
    return {"amplification_readings": readings, "attention_to_k_variance": main["variance"],
            "attention_to_k_scale_control": main["scale control"],
            "attention_to_k_shift_control": main["shift control"],
            "amplification_beats_controls": at_top["variance"] >= CONTROL_GAIN * max(at_top["scale control"],
                                                                                    at_top["shift control"]),
            **{name: {arm: [p[name] for p in passes] for arm, passes in probed.items()} for name in PROBED}}


# ----------------------------------------------------------------------------- figures

def plot_mask(baseline, masked, k, path):
    baseline, masked = baseline[:-1], masked[:-1]  # the last key has no later query
    positions = np.arange(len(baseline))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(positions, baseline, color="tab:blue", label="baseline")
    ax.plot(positions, masked, color="tab:red", label=f"token {k} attends only to itself")
    ax.axvline(k, color="gray", linestyle=":")
    ax.set(xlabel="key position j", ylabel="mean attention received from queries t > j", yscale="log",
           title=f"Fig. 5 / 19: mask intervention at k = {k}")
    ax.legend()
    save_figure(fig, path)


def plot_amplification(readings, main_where, k, path):
    """Small multiples: one panel per place of the edit; attention to k against lambda, one line per arm
    and mean (a reading measured at the largest lambda only is a single point)."""
    wheres = list(dict.fromkeys(r["where"] for r in readings))
    fig, axes = plt.subplots(1, len(wheres), figsize=(4.5 * len(wheres), 4), sharey=True, squeeze=False)
    for ax, where in zip(axes[0], wheres):
        for r in (r for r in readings if r["where"] == where):
            ax.plot(r["lambdas"], r["attention_to_k"], "o-" if r["mu"] == "windows" else "s--",
                    color=ARM_COLORS[r["arm"]], alpha=1.0 if r["mu"] == "windows" else 0.5,
                    label=f"{r['arm']}, mu over {r['mu']}")
        ax.axhline(SINK_THRESHOLD, color="black", linewidth=0.5, linestyle=":", label=f"Gu et al.'s {SINK_THRESHOLD}")
        ax.set(xscale="log", xlabel="λ", xticks=LAMBDAS, xticklabels=[str(lam) for lam in LAMBDAS], xlim=(0.8, 40),
               title=f"edit in {where}" + (" (main)" if where == main_where else ""))
        ax.minorticks_off()
    axes[0][0].set_ylabel(f"mean attention received by token {k}")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Fig. 6 / 20: variance amplification at k = {k} and two controls at the same norm")
    save_figure(fig, path)


def plot_authors_reading(by_arm, k, observe, path):
    """Fig. 6 as the authors draw it: attention to k at L_obs against lambda (linear), one line per arm."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, attention in by_arm.items():
        ax.plot(AUTHORS_LAMBDAS, attention, "o-", color=ARM_COLORS[arm],
                label="variance amplification" if arm == "variance" else arm)
    ax.text(0.03, 0.95, r"for $l < L_{obs}$: $o^{(l)} \leftarrow \mu^{(l)} + \lambda\,(o^{(l)} - \mu^{(l)})$",
            transform=ax.transAxes, va="top", bbox=dict(facecolor="wheat", alpha=0.5))
    ax.set(xlabel="λ (applied to the layers below L_obs)", ylabel=f"attention to token {k} at layer {observe}",
           ylim=(0, 1.05), xticks=AUTHORS_LAMBDAS, title=f"Fig. 6, the authors' reading: L_obs = layer {observe}")
    ax.grid(linestyle="--", alpha=0.5)
    ax.legend(loc="upper right")
    save_figure(fig, path)


def draw(metrics, run):
    m, k = metrics, metrics["k"]
    plot_mask(np.array(m["attention_received_baseline"]), np.array(m["attention_received_masked"]), k,
              run.path("fig5_mask_intervention.png"))
    plot_amplification([r for r in m["amplification_readings"] if r["where"] != BELOW], m["amplification_main"]["where"],
                       k, run.path("fig6_variance_amplification.png"))
    plot_authors_reading(reading(m["amplification_readings"], BELOW, VALUES), k,
                         m["amplification_authors"]["observe_layer"], run.path("fig6_authors_reading.png"))


# ----------------------------------------------------------------------------- report

def report(metrics, subject):
    print_tables(metrics, subject)
    print_verdicts(metrics, subject)


def print_tables(m, subject):
    k, baseline, masked = m["k"], m["attention_received_baseline"], m["attention_received_masked"]
    print(f"{subject}, {m['n_windows']} held-out windows of {len(baseline)} tokens; masked in layers {m['masked_layers']}, "
          f"attention averaged over layers {m['measured_layers']} and their heads")
    rows = [["attention received by token 0", baseline[0], masked[0]],
            [f"attention received by token k = {k}", baseline[k], masked[k]],
            ["argmax over positions >= 1", m["attention_received_argmax_baseline"], m["attention_received_argmax_masked"]]]
    rows += [[f"attention entropy, layer {i}", before, after]
             for i, (before, after) in enumerate(zip(m["entropy_by_layer_baseline"], m["entropy_by_layer_masked"]))]
    print_table(rows, ["mask intervention", "baseline", "masked"])
    neuron = m["super_neuron"]
    print(f"\nsuper neuron: layer {neuron['layer']} unit {neuron['unit']} (row-norm z: W_gate {neuron['gate_norm_z']:.1f}, "
          f"W_up {neuron['up_norm_z']:.1f}); largest |activation| on token 0: unit {neuron['activation_argmax_unit']} "
          f"({'agrees' if neuron['activation_argmax_agrees'] else 'disagrees'}); its activation on token 0: "
          f"{neuron['activation_token0']:.3g}\n")
    main, authors = m["amplification_main"], m["amplification_authors"]
    print(f"variance amplification, main reading (the verdict's): edit in {main['where']} ({main['layers_rule']}), "
          "mu over windows")
    columns = [m["superneuron_activation_at_k"], m["dominance_ratio_at_k"],
               reading(m["amplification_readings"], main["where"], "windows")]  # each {arm: a number by lambda}
    print_table([[lam] + [column[arm][j] for column in columns for arm in ARMS] for j, lam in enumerate(LAMBDAS)],
                ["λ", "neuron at k", "(scale)", "(shift)", "dominance at k", "(scale)", "(shift)",
                 "attention to k", "(scale)", "(shift)"])
    print(f"\nvariance amplification, the authors' reading (printed beside the main one, not the verdict's): edit in "
          f"every layer below L_obs = {authors['observe_layer']} ({authors['observe_layer_rule']}), mu = each layer's "
          f"mean value vector over {authors['random_tokens']} random tokens; attention to k at layer "
          f"{authors['observe_layer']} alone")
    by_lambda = reading(m["amplification_readings"], BELOW, VALUES)
    print_table([[lam] + [by_lambda[arm][j] for arm in ARMS] for j, lam in enumerate(AUTHORS_LAMBDAS)],
                ["λ", "attention to k", "(scale)", "(shift)"])
    print(f"\nattention to k = {k} at each reading's largest λ, every reading (baseline {baseline[k]:.3g})")
    print_table([[r["where"], r["mu"], layers_name(r["observed"]), r["arm"], r["lambdas"][-1], r["attention_to_k"][-1]]
                 for r in m["amplification_readings"]],
                ["edit in", "mu over", "attention read in", "arm", "λ", "attention to k"])


def print_verdicts(m, subject):
    k, baseline, masked, u = m["k"], m["attention_received_baseline"], m["attention_received_masked"], m["token0_unit"]
    print(f"{subject}, the chain at k under the mask: the token-0 unit (layer {u['layer']} unit {u['unit']}, found by "
          f"activation: {u['token0_ratio']:.1f}x on token 0) gives |activation| {u['at_k_masked']:.3g} at k masked, "
          f"{u['at_k_unmasked']:.3g} unmasked ({u['at_k_masked'] / max(u['at_k_unmasked'], 1e-12):.1f}x; "
          f"token 0: {u['at_token0']:.3g})")
    print(f"\n{subject}, mask, as the paper draws it (Fig. 5): k = {k} is "
          + ("" if m["mask_peak"] == k else "not ") + f"the peak of attention received over positions 1.."
          f"{len(baseline) - 1 - MIN_LATER_QUERIES} (those that at least {MIN_LATER_QUERIES} later queries see; peak "
          f"{m['mask_peak']}) and receives {masked[k] / baseline[k]:.1f}x its unmasked attention (ours: at least "
          f"{MASK_GAIN}x) -> the sink {'moves' if m['mask_peak_moved_to_k'] else 'does not move'} to k; "
          f"{m['mask_heads_over_threshold_on_k']} of {m['mask_heads_measured']} heads give k a mean attention >= "
          f"{SINK_THRESHOLD}")
    print(f"{subject}, mask, stricter (Gu et al.'s threshold {SINK_THRESHOLD} on the layer mean of the attention k "
          f"receives): the sink {'moves' if m['sink_moved_to_k'] else 'does not move'} to k = {k} (argmax "
          f"{m['attention_received_argmax_masked']}, {masked[k]:.3g} received)")
    observe, authors = m["amplification_authors"]["observe_layer"], reading(m["amplification_readings"], BELOW, VALUES)
    top = {arm: attention[-1] for arm, attention in authors.items()}
    print(f"{subject}, amplification as the authors read it (below L_obs = {observe}, attention at layer {observe} "
          f"alone; not the verdict's reading): attention to k {authors['variance'][0]:.3g} at λ = 1, at λ = "
          f"{AUTHORS_LAMBDAS[-1]} {top['variance']:.3g} (variance) vs {top['scale control']:.3g} (scale control) and "
          f"{top['shift control']:.3g} (shift control); "
          + ("a sink at k" if top["variance"] >= SINK_THRESHOLD else "no sink at k") + f" (Gu et al.'s {SINK_THRESHOLD})")
    main = reading(m["amplification_readings"], m["amplification_main"]["where"], "windows")
    top = {arm: attention[-1] for arm, attention in main.items()}
    gain_over_controls = top["variance"] / max(top["scale control"], top["shift control"], 1e-12)
    print(f"{subject}, amplification at λ = {LAMBDAS[-1]} (main reading, the verdict's: {m['amplification_main']['where']}, "
          f"mu over windows): attention to k {top['variance']:.3g} (variance) vs {top['scale control']:.3g} (scale "
          f"control) and {top['shift control']:.3g} (shift control), {gain_over_controls:.1f}x the larger control "
          f"(ours: at least {CONTROL_GAIN}x) -> " + ("variance, not norm, moves attention to k"
                                                   if m["amplification_beats_controls"] else
                                                   "variance and norm are not separated here")
          + "; " + ("a sink at k" if top["variance"] >= SINK_THRESHOLD else "no sink at k")
          + f" (Gu et al.'s {SINK_THRESHOLD} on the layer mean)")


# ----------------------------------------------------------------------------- main

def parser():
    p = script_parser(__doc__)
    p.add_argument("--k", type=int, default=None, help="the position to turn into a sink (default 10)")
    p.add_argument("--from_layer", type=int, default=0, help="mask in this layer and the later ones")
    p.add_argument("--amplify_layers", default=None,
                   help="edit these layers' aggregation output, e.g. 0-1 (default: from 0 to the token-0 unit's layer)")
    p.add_argument("--observe_layer", type=int, default=None,
                   help="L_obs of the authors' reading (default: the first sink layer from 1 on)")
    return p


def layer_range(text, n_layer):
    """'0-1' or '3' -> [0, 1] or [3]: the layers whose aggregation output --amplify_layers edits."""
    try:
        first, _, last = text.partition("-")
        layers = list(range(int(first), int(last or first) + 1))
    except ValueError:
        layers = []
    if not layers or layers[0] < 0 or layers[0] > n_layer - 2 or layers[-1] > n_layer - 1:
        raise InputError(f"--amplify_layers {text}: give FIRST-LAST or one layer within 0..{n_layer - 1}, "
                         f"starting at most at {n_layer - 2} so that a later layer can see the change")
    return layers


def checked_options(args, T, n_layer):
    """-> (k, the layers --amplify_layers names or None), every option checked before the first pass."""
    k = args.k if args.k is not None else default_k(T)
    if not 1 <= k < T - 1:
        raise InputError(f"--k {k} is outside the window of {T} tokens: choose 1..{T - 2} "
                         "(token 0 already attends only to itself, and the last token has no later query)")
    if not 0 <= args.from_layer < n_layer - 1:
        raise InputError(f"--from_layer {args.from_layer}: choose 0..{n_layer - 2}, so that a later layer can see the change")
    if args.observe_layer is not None and not 1 <= args.observe_layer < n_layer:
        raise InputError(f"--observe_layer {args.observe_layer}: choose 1..{n_layer - 1}, so that a layer below it "
                         "can be edited")
    return k, layer_range(args.amplify_layers, n_layer) if args.amplify_layers else None


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    run = setup(args, __file__, argv=argv)
    model, x, bos = studied_model(run, N_WINDOWS)  # x: (N, T) held-out windows
    T, n_layer = x.shape[1], model.config.n_layer
    k, amplify_layers = checked_options(args, T, n_layer)
    neuron = find_super_neuron(model, x)
    metrics = {"n_windows": len(x), "k": k, "from_layer": args.from_layer, **mask_intervention(model, x, k, args.from_layer)}
    # Main reading: the layers up to the token-0 unit's, mu over windows (the docstring says why).
    main_layers = amplify_layers or list(range(metrics["token0_unit"]["layer"] + 1))
    main_rule = "--amplify_layers" if amplify_layers else "up to the token-0 unit's layer"
    # The authors' reading: mu from the values of the layers below L_obs on random tokens, attention at L_obs alone.
    if args.observe_layer is None:
        observe, observe_why = observe_layer(metrics["sink_rate_by_layer"], metrics["first_token_attention_by_layer"])
    else:
        observe, observe_why = args.observe_layer, "--observe_layer"
    means, n_random = random_value_means(model, run, T, bos, range(observe))
    plan = amplification_plan(main_layers, n_layer, observe)
    metrics |= {"lambdas": list(LAMBDAS),
                "amplification_main": dict(where=layers_name(main_layers), layers=main_layers, mu="windows",
                                           layers_rule=main_rule),
                "amplification_authors": dict(where=BELOW, layers=list(range(observe)), mu=VALUES, observe_layer=observe,
                                              observe_layer_rule=observe_why, random_tokens=n_random,
                                              lambdas=list(AUTHORS_LAMBDAS)),
                **variance_amplification(model, x, k, plan, layers_name(main_layers), means, probes_at_k(neuron, k, n_layer)),
                "super_neuron": neuron}
    metrics = write_metrics(metrics, run)
    draw(metrics, run)
    report(metrics, run.subject)
    return metrics


if __name__ == "__main__":
    run_script(main)

"""
02 - Super neurons and the channel-sparse down-projection (paper §4.2; Fig. 8, 9, 10).

Claim. A few hidden units of the early SwiGLU FFNs have much larger weight-row L2 norms in
W_gate and W_up than the rest ("super neurons", Fig. 8; Llama-2 layer 1, unit 7890). Token 0's
normalised FFN input points along such a unit's W_gate row, so it alone gets a massive
activation while later tokens are suppressed (Fig. 9). The unit's W_down column is
heavy-tailed: the activation lands in a handful of residual dimensions, which become token
0's massive dimensions (Fig. 10; Llama-2 dimension 2533).

What this script measures, on 64 held-out windows (16 for a pretrained model):
  - per layer, the row L2 norms of W_gate and W_up for every hidden unit and their z-scores
    over the layer's units. Rule: a unit is a super neuron when z >= 3 in both W_gate and
    W_up. The top super neuron is the unit of the early layers (0 and 1; the first quarter
    of a deep model) with the largest z(W_gate) + z(W_up), the rule 04 uses; it is listed
    even when it misses z >= 3 (then `rule_met` is false);
  - the cross-check by activation (Yu et al. 2024, super weights): per layer, the unit with
    the largest mean |activation| on token 0, i.e. the argmax input channel of W_down on
    token 0 (blocks.{i}.mlp.hook_hidden); whether it is the top super neuron;
  - token0_activation_ratio: mean |activation| of the unit on token 0 over its mean on t >= 1
    (measures.super_neuron_record describes each unit listed);
  - for the top super neuron, per position: the cosine between the normalised FFN input
    mlp_norm(resid_in + attention output) and the unit's W_gate row (= the gate pre-activation
    hook_gate divided by both norms), and the raw activation (Fig. 9);
  - its W_down column: sorted magnitudes, kurtosis (Pearson: 3 for a Gaussian), the top 3
    output dimensions, and token 0's 3 massive dimensions: the largest mean |x_i| of token
    0's residual stream right after that layer. massive_dims_match: the largest |W_down|
    entry is one of token 0's massive dimensions (Fig. 10).
A small model may show none of this; the script prints its numbers and says so.

Run:  python 02_super_neurons.py [--quick] [--model smollm2-135m]
      (figures and metrics.json in out/02_super_neurons/, or out/02_super_neurons/<model>/)

Exercises (cpu profile; each takes seconds once the model is cached)
  1. Reading. `kurtosis` is E[(x - mean)^4] / var^2. What is it for a one-hot column of
     n_embd = 64 entries (the most heavy-tailed column there is), and for a Gaussian one?
     Check that `wdown_column_kurtosis` lies below the first.
  2. Predicting. Without BOS, token 0 is a different byte in every window. If the top unit
     reacts to token 0's position and not to its byte, how should `cosine_std_token0` (the
     spread over windows of token 0's cosine with the W_gate row) compare with
     `cosine_std_others`? Check in metrics.json. Then predict both for
     `--profile cpu_bos`, where token 0 is always the BOS token, and run it.
  3. Changing code. Add a flag `--z_threshold` that replaces SUPER_NEURON_Z (the default of
     `super_neurons`). Predict how the number of entries of `super_neurons` with `rule_met`
     changes from `--z_threshold 3` to `--z_threshold 2`, then run both.
  4. Changing code. Add a flag `--ablate` that zeroes the top super neuron's activation in the
     forward pass that records the residual stream: find its layer and unit from the weights
     first (`unit_with_largest_row_norms`, as `super_neurons` does), then pass `run_with_cache`
     an edit of `blocks.{layer}.mlp.hook_hidden` that sets that unit to 0. Predict, then check,
     what happens to `token0_massive_ratio` (token 0's max|x| / median|x| right after that layer).
"""
import numpy as np
import torch

from cli import N_WINDOWS, print_table, run_script, save_figure, script_parser, setup, studied_model, write_metrics
import matplotlib.pyplot as plt  # after cli, which chooses matplotlib's file-only backend
from measures import (SUPER_NEURON_Z, early_layers, massive_activation_ratio, row_norms, super_neuron_record,
                      unit_most_active_on_token0, unit_with_largest_row_norms, zscores)

TOP_DIMS = 3  # how many output dimensions count as "top" and as "massive"
HOOKS = ["blocks.*.hook_resid_in", "blocks.*.attn.hook_out", "blocks.*.mlp.hook_gate", "blocks.*.mlp.hook_hidden",
         "hook_resid_final"]


# ----------------------------------------------------------------------------- measures

def kurtosis(x):
    """Pearson's kurtosis E[(x - mean)^4] / var^2 of a 1-D tensor (population moments): 3 for a Gaussian."""
    centred = x.double() - x.double().mean()
    return float(centred.pow(4).mean() / centred.pow(2).mean().pow(2).clamp_min(1e-300))


def gate_cosine(gate, normed_input, gate_row):
    """Cosine between each normalised FFN input (N, T, C) and a W_gate row (C,), from the
    recorded pre-activation gate (N, T) = normed_input @ gate_row."""
    return gate / (normed_input.norm(dim=-1) * gate_row.norm()).clamp_min(1e-12)


def mlp_row_norms(model):
    """{layer: (W_gate row norms, W_up row norms)}, (ffn,) each: one pair per hidden unit (Fig. 8)."""
    return {i: (row_norms(block.mlp.w_gate.weight), row_norms(block.mlp.w_up.weight))
            for i, block in enumerate(model.blocks)}


def ffn_input(block, resid_in, attn_out, device):
    """The FFN's input (N, T, C): mlp_norm of the residual stream after the attention, resid_in + attn_out."""
    with torch.no_grad():
        return block.mlp_norm((resid_in + attn_out).to(device)).float().cpu()


# ----------------------------------------------------------------------------- the paper's steps

def super_neurons(norms, hidden, z_threshold=SUPER_NEURON_Z):
    """Fig. 8: the units whose W_gate and W_up row norms both have z >= z_threshold, and the top unit of the
    early layers by z(W_gate) + z(W_up), listed whether or not it meets the rule; with Yu et al.'s cross-check,
    the unit most active on token 0 in each layer. norms: mlp_row_norms'; hidden: {layer: (N, T, ffn)}."""
    zs = {i: (zscores(gate), zscores(up)) for i, (gate, up) in norms.items()}
    top_layer, top_unit = unit_with_largest_row_norms({i: zs[i] for i in early_layers(len(zs))})
    units = {(i, int(u)) for i, (z_gate, z_up) in zs.items()
             for u in torch.nonzero((z_gate >= z_threshold) & (z_up >= z_threshold)).flatten()}
    units.add((top_layer, top_unit))
    records = {(i, u): super_neuron_record(i, u, *zs[i], hidden[i], z_threshold) for i, u in units}
    return {"super_z_threshold": z_threshold,
            "super_neurons": sorted(records.values(), key=lambda s: -(s["gate_norm_z"] + s["up_norm_z"])),
            "top_super_neuron": records[top_layer, top_unit],
            "activation_argmax_unit_by_layer": [unit_most_active_on_token0(h) for h in hidden.values()]}


def selective_activation(model, cache, neuron, device):
    """Fig. 9: the cosine of each position's normalised FFN input with the unit's W_gate row, and its activation."""
    layer, unit = neuron["layer"], neuron["unit"]
    block = model.blocks[layer]
    normed = ffn_input(block, cache[f"blocks.{layer}.hook_resid_in"], cache[f"blocks.{layer}.attn.hook_out"], device)
    gate_row = block.mlp.w_gate.weight[unit].detach().float().cpu()  # (C,)
    cosine = gate_cosine(cache[f"blocks.{layer}.mlp.hook_gate"][..., unit], normed, gate_row)  # (N, T)
    activation = cache[f"blocks.{layer}.mlp.hook_hidden"][..., unit]  # (N, T)
    return {"cosine_by_position": cosine.mean(0).tolist(), "activation_by_position": activation.mean(0).tolist(),
            "cosine_token0": float(cosine[:, 0].mean()), "cosine_others": float(cosine[:, 1:].mean()),
            "cosine_std_token0": float(cosine[:, 0].std()), "cosine_std_others": float(cosine[:, 1:].std(dim=0).mean()),
            "activation_others": float(activation[:, 1:].mean())}


def wdown_column(model, cache, neuron):
    """Fig. 10: the unit's W_down column (sorted magnitudes, kurtosis, top dimensions) against token 0's
    massive dimensions in the residual stream right after the unit's layer."""
    layer, unit = neuron["layer"], neuron["unit"]
    column = model.blocks[layer].mlp.w_down.weight[:, unit].detach().float().cpu()  # (C,)
    sorted_magnitudes, order = column.abs().sort(descending=True)
    top_dims = order[:TOP_DIMS].tolist()
    after = f"blocks.{layer + 1}.hook_resid_in" if layer + 1 < len(model.blocks) else "hook_resid_final"
    token0_after = cache[after][:, 0]  # (N, C)
    massive = token0_after.abs().mean(0).argsort(descending=True)[:TOP_DIMS].tolist()
    return {"wdown_column_sorted": sorted_magnitudes.tolist(), "wdown_column_kurtosis": kurtosis(column),
            "wdown_top_dims": top_dims, "massive_dims": massive, "massive_dims_match": top_dims[0] in massive,
            "token0_massive_ratio": float(massive_activation_ratio(token0_after).mean())}


# ----------------------------------------------------------------------------- figures

def plot_row_norms(norms, supers, path):
    """One panel per layer; a deep model's early layers only, where 04 and the paper look."""
    shown = range(len(norms)) if len(norms) <= 4 else early_layers(len(norms))
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 4), squeeze=False)
    for layer, ax in zip(shown, axes[0]):
        gate, up = (n.numpy() for n in norms[layer])
        ax.scatter(gate, up, s=6, color="tab:gray", label="hidden units")
        for s in (s for s in supers if s["layer"] == layer):
            ax.scatter(gate[s["unit"]], up[s["unit"]], s=40, color="tab:red")
            ax.annotate(str(s["unit"]), (gate[s["unit"]], up[s["unit"]]), fontsize=8)
        ax.set(xlabel="W_gate row L2 norm", ylabel="W_up row L2 norm", title=f"Fig. 8: layer {layer}")
    save_figure(fig, path)


def plot_selectivity(cosine, activation, neuron, path):
    positions = np.arange(len(cosine))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["tab:red"] + ["tab:blue"] * (len(cosine) - 1)
    left.bar(positions, cosine, color=colors)
    left.set(xlabel="position t", ylabel="cos(normalised FFN input, W_gate row)",
             title=f"Fig. 9: layer {neuron['layer']} unit {neuron['unit']}, alignment")
    right.bar(positions, activation, color=colors)
    right.set(xlabel="position t", ylabel="activation silu(gate) * up (mean over windows)",
              title="Fig. 9: activation (token 0 in red)")
    save_figure(fig, path)


def plot_wdown(sorted_magnitudes, kurt, top_dims, massive, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(sorted_magnitudes)), sorted_magnitudes, "o-", markersize=3)
    ax.set(xlabel="rank", ylabel="|W_down column entry|",
           title=f"Fig. 10: super neuron's W_down column (kurtosis {kurt:.1f})")
    ax.text(0.35, 0.8, f"top output dims {top_dims}\ntoken 0's massive dims {massive}", transform=ax.transAxes)
    save_figure(fig, path)


def draw(metrics, norms, run):
    plot_row_norms(norms, metrics["super_neurons"], run.path("fig8_row_norms.png"))
    plot_selectivity(metrics["cosine_by_position"], metrics["activation_by_position"], metrics["top_super_neuron"],
                     run.path("fig9_selective_activation.png"))
    plot_wdown(metrics["wdown_column_sorted"], metrics["wdown_column_kurtosis"], metrics["wdown_top_dims"],
               metrics["massive_dims"], run.path("fig10_wdown_column.png"))


# ----------------------------------------------------------------------------- report

def report(metrics, subject, window):
    m, top = metrics, metrics["top_super_neuron"]
    n_layer = len(m["activation_argmax_unit_by_layer"])
    print(f"{subject}, {m['n_windows']} held-out windows of {window} tokens; rule: row-norm z >= "
          f"{m['super_z_threshold']:g} in both W_gate and W_up (the top unit of layers {early_layers(n_layer)} by z sum "
          "is listed in any case)")
    print_table([[s["layer"], s["unit"], s["gate_norm_z"], s["up_norm_z"], s["token0_activation_ratio"],
                  "yes" if s["rule_met"] else "no", s["activation_argmax_unit"]] for s in m["super_neurons"]],
                ["layer", "unit", "z W_gate", "z W_up", "|act| 0/others", "rule met", "argmax |act| on token 0"])
    n_rule_met = sum(s["rule_met"] for s in m["super_neurons"])
    print(f"\n{subject}: {n_rule_met} unit(s) meet the rule" + ("" if n_rule_met else
          ": no super neuron by weight in this model (the top unit is listed anyway)")
          + f"\ntop unit: layer {top['layer']} unit {top['unit']}, |activation| on token 0 "
          f"{top['token0_activation_ratio']:.3g}x the others'; Yu et al.'s argmax on token 0 in that layer: "
          f"unit {top['activation_argmax_unit']} ({'agrees' if top['activation_argmax_agrees'] else 'disagrees'})\n")
    print_table([["cos(FFN input, W_gate row)", m["cosine_token0"], m["cosine_others"]],
                 ["activation", top["activation_token0"], m["activation_others"]]],
                ["Fig. 9", "token 0", "t >= 1 (mean)"])
    selective = m["cosine_token0"] > m["cosine_others"] and top["token0_activation_ratio"] > 1
    print(f"{subject}: token 0 {'is' if selective else 'is not'} selectively aligned and activated "
          "(higher cosine and larger |activation| than the others)")
    print(f"\n{subject}, W_down column: kurtosis {m['wdown_column_kurtosis']:.3g} (Gaussian: 3), top output dims "
          f"{m['wdown_top_dims']}; token 0's massive dims after layer {top['layer']}: {m['massive_dims']} (max/median "
          f"{m['token0_massive_ratio']:.3g}); "
          + ("the largest W_down entry lands on one of them" if m["massive_dims_match"] else
             "the largest W_down entry is none of them: the channel-sparse route does not show here"))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = script_parser(__doc__).parse_args(argv)
    run = setup(args, __file__, argv=argv)
    model, x, _ = studied_model(run, N_WINDOWS)  # x: (N, T) held-out windows
    norms = mlp_row_norms(model)
    _, cache = model.run_with_cache(x, record=HOOKS)
    hidden = {i: cache[f"blocks.{i}.mlp.hook_hidden"] for i in norms}  # (N, T, ffn) each
    metrics = {"n_windows": len(x), **super_neurons(norms, hidden)}
    top = metrics["top_super_neuron"]
    metrics |= {**selective_activation(model, cache, top, run.device), **wdown_column(model, cache, top)}
    metrics = write_metrics(metrics, run)
    draw(metrics, norms, run)
    report(metrics, run.subject, x.shape[1])
    return metrics


if __name__ == "__main__":
    run_script(main)

"""
05 - The fix: pretrain with head-wise RMSNorm, sigmoid and gated attention (paper §5; Fig. 2, 13, 14, 15, 16, 23).

Claim. Token 0 becomes a sink because its aggregation output o_{0,h} = v_0 has a larger
variance than the averages o_{t,h} of later tokens (01), which the FFN turns into dimension
disparity (02, 03). Normalise each head's output right after value aggregation,
o_{t,h} <- g_h * o_{t,h} / RMS(o_{t,h}) before W_O ("head-wise RMSNorm"), and the
discrepancy, across positions and across heads (Fig. 13: low-entropy heads give
high-variance outputs), is gone before W_O sees it. Trained this way, a model has no sink
(Fig. 2), no token-0 dominance ratio spike (Fig. 14), a higher effective rank (Fig. 15),
and its validation loss falls faster, over several seeds (Fig. 16). Sigmoid attention (no
sum-to-one constraint) and gated attention (o_{t,h} * sigmoid(W_g x_t), Fig. 23) are the
comparisons.

The fixes the field ships (--variants sink_logit,softmax1,kv_bias): an extra slot in each head's
softmax that is no token, where a head can put weight "nowhere": a learnable logit per head
(gpt-oss), that logit fixed at 0 (softmax off by one, E. Miller 2023), a learnable key and value
per head (Sun et al. 2024). The paper's chain predicts that the slot takes over the sink's job, so
the sink on token 0 goes; whether token 0's variance discrepancy, super neurons and dimension
disparity go with it tells which link drives which.

What this script does. It trains the paper's four variants of model.py with the profile's recipe
(on the CPU by default `cpu_bos`: the series' own cpu recipe grows no full sink without a BOS
token, so 05 takes the recipe with a BOS token whose layer-0 sink a fix can remove; docs/recipe_search.md),
the same token budget and the same data order, for each of --seeds seeds (seed --seed,
--seed + 1, ...; default one seed: four models). The checkpoint cache keeps every
run, so a second call only analyses. It prints the expected training time first: each
variant's step planned as its training will run it (training.planned_step on a fresh model:
precision, micro-batch, compiled where training compiles, one step timed here), times the
steps of every run still to train (an estimate, a little short: the optimizer step, the
evaluations and the snapshots are not in it; how short, measured: docs/gpu.md).
Each training keeps --snapshots models along the way (default 8, step 0 and log-spaced steps),
and every link of the paper's chain is measured at each (measures.chain_links): the table,
the step at which each link formed, and whether they formed in the paper's order
(fig_emergence.png). Then, on 64 held-out windows, per variant (mean over seeds):
  - validation loss every eval_interval steps, mean and min-max band over seeds (Fig. 16);
    the final loss, and the first evaluated step at which the variant's mean curve reaches
    the baseline's mean final loss (resolution: eval_interval steps);
  - mean attention to token 0 per layer, over heads and queries t >= 1 (Fig. 2); sigmoid
    rows are first divided by their sum of |A| (Gu et al.'s convention);
  - Gu et al.'s sink rate per layer and per seed: a head is a sink in a window when its
    attention to token 0, averaged over all the window's queries (alpha), is above 0.3; the
    rate is the share of (window, head) pairs that are. The sink verdicts use it;
  - token 0's dominance ratio max|x_i| / mean|x_i| after each block's RMSNorm, gain included,
    as the paper measures it (Fig. 14), and the effective rank of each window's (T, C) hidden
    states (Fig. 15), per residual stream: entering block i, and for i = n_layer the stream
    leaving the last block;
  - the variance at each position of layer 0's aggregation output, across the head
    dimensions within one token (Fig. 23; the paper's "Layer 1", counting from 1), measured
    on the value aggregation itself (hook_head_out), before the head-wise norm or the gate.
    After the head-wise norm (hook_head_out_post, plotted beside it) every head vector has
    RMS 1 times its gain, so that curve is flat by construction and shows only the gains:
    it cannot tell whether the model still aggregates into a discrepancy; the left panel can.
    (Why within a token and not per dimension across sequences: Exercise 2.)
  - for the baseline (seed --seed): each head's attention entropy and the variance of its
    output, heads sorted by entropy (Fig. 13), with their Spearman rank correlation.
At our scale the baseline may have no sink to remove: the script prints the numbers and
says whether each of the paper's claims holds here.

Run:  python 05_pretrain_headwise.py [--quick] [--variants softmax,headwise] [--seeds 3]
      (figures and metrics.json in out/05_pretrain_headwise/; checkpoints in out/checkpoints/)

Exercises (cpu_bos profile; a new training takes 4 to 5 minutes on 2 cores, analysis seconds)
  1. Reading, then changing code. `steps_to_reach` only looks at evaluated steps, so
     `steps_to_baseline_loss` moves in jumps of eval_interval (500). Predict how far off it
     can be, then make `steps_to_reach` interpolate linearly between the two evaluations
     around the crossing (return a float). Watch `steps_to_baseline_loss`.
  2. Predicting. In `analyse`, `var_by_position` uses the second reading of
     `variance_by_position` (within one token). Predict entry 0 of the first reading (across
     sequences) for every variant, switch both `variance_by_position(...)[1]` to `[0]`, run,
     and check `var_by_position`.
  3. Changing code. Make head-wise RMSNorm a head-wise LayerNorm: in
     `CausalSelfAttention.forward` (model.py) subtract each head vector's mean over its
     head_dim before `rms_normalize`. The cache keys on configs, not code, so run in a fresh
     folder that holds only the baseline:
       mkdir -p out_ln/checkpoints && cp out/checkpoints/cpu_bos-softmax-seed0-*.pt out_ln/checkpoints/
       python 05_pretrain_headwise.py --variants softmax,headwise --out_dir out_ln
     Compare `val_loss_final["headwise"]` and `first_token_attention_by_layer` with out/.
  4. Predicting. Head-wise RMSNorm's gain starts at token 0's output scale (the authors' rule,
     `calibrate_head_norm_gain` in model.py); the arm `headwise_ones` starts it at 1, as this
     project once did, several times the scale of every head output at init. The seed study
     (docs/results.md) found the gain of ones 0.07 nats worse on the `cpu` recipe. Predict whether it also
     keeps more sink heads on `cpu_bos`, then run `--variants softmax,headwise,headwise_ones` (one
     more model) and compare `sink_rate_by_seed` and `val_loss_final`. (No check: a reading.)
  5. Predicting. Gu et al. find that a larger weight decay makes sinks stronger. Add
     weight_decay=0.5 to PROFILES["cpu_bos"]["train"] (training.py; a new config retrains by itself)
     and run `--variants softmax` (then weight_decay=0.0, if you have another 10 minutes).
     Predict, then compare with the default 0.1, the maxima of
     `first_token_attention_by_layer["softmax"]` and `dominance_ratio_token0_by_layer["softmax"]`.
Checks for 1-3: `python -m pytest -m exercises tests/`.
"""
import os
from dataclasses import replace

import numpy as np
import torch

from cli import (N_WINDOWS, cost_text, emergence, make_folder, order_text, plot_emergence, plot_head_entropy,
                 print_emergence_table, print_link_bars, print_table, run_script, save_figure, script_parser, setup,
                 write_metrics)
import matplotlib.pyplot as plt  # after cli, which chooses matplotlib's file-only backend
from measures import (SINK_LAYER_SHARE, SINK_THRESHOLD, attention_entropy_by_head, has_sink, removes_sink, first_token_attention, head_output_variance,
                      interval_verdict, mean_effective_rank, paired_interval, rank_correlation, sink_rate,
                      token0_dominance_by_window, variance_by_position)
from model import ATTENTION_VARIANTS, GPT, SLOT_VARIANTS, InputError
from training import (ARMS, checkpoint_path, close_distributed, duration_text, init_distributed, planned_step,
                      in_cache, profile_configs, trained_model)

PAPER_VARIANTS = tuple(v for v in ATTENTION_VARIANTS if v not in SLOT_VARIANTS)  # 05's default: the paper's four
DEFAULT_PROFILE = "cpu_bos"  # on the CPU: the recipe with a BOS sink for the fixes to remove (docs/recipe_search.md)
AGGREGATION_LAYER = 0  # the layer whose aggregation output Fig. 23 shows
LABELS = {"softmax": "baseline (softmax)", "sigmoid": "sigmoid", "headwise": "head-wise RMSNorm", "gated": "gated",
          "headwise_nodecay": "head-wise, gain not decayed", "headwise_ones": "head-wise, gain of ones",
          "sink_logit": "sink logit (gpt-oss)", "softmax1": "softmax off by one", "kv_bias": "key/value bias (Sun et al.)"}
# Head-wise RMSNorm's two choices, each as a paired difference of arms (ARMS in training.py): the first minus the second.
HEAD_NORM_ABLATIONS = {"calibrated gain minus gain of ones": ("headwise_nodecay", "headwise_ones"),
                       "gain decayed minus not decayed": ("headwise", "headwise_nodecay")}
COLORS = {"softmax": "tab:red", "sigmoid": "tab:green", "headwise": "tab:blue", "gated": "tab:purple",
          "headwise_nodecay": "tab:cyan", "headwise_ones": "tab:olive", "sink_logit": "tab:orange",
          "softmax1": "tab:brown", "kv_bias": "tab:pink"}
SINK_RATE_NAME = f"Gu et al.'s sink rate (a head with alpha > {SINK_THRESHOLD} in a window, per window)"


# ----------------------------------------------------------------------------- measures

def steps_to_reach(steps, losses, target):
    """The first evaluated step whose loss is at most target; None if the curve never gets there."""
    return next((step for step, loss in zip(steps, losses) if loss <= target), None)


def analyse(model, x):
    """One forward pass over the windows x (N, T) -> this model's measures, as lists of floats."""
    n_layer = model.config.n_layer
    _, cache = model.run_with_cache(x, record=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_head_out*",
                                               "blocks.*.hook_resid_in", "blocks.*.hook_attn_in", "hook_resid_final",
                                               "blocks.*.attn.hook_slot"])  # the slot: SLOT_VARIANTS only
    resid = [cache[f"blocks.{i}.hook_resid_in"] for i in range(n_layer)] + [cache["hook_resid_final"]]  # (N, T, C) each
    normalised = [cache[f"blocks.{i}.hook_attn_in"] for i in range(n_layer)]  # after each block's RMSNorm, gain included
    patterns = [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layer)]  # (N, H, T, T) each
    head_outs = [cache[f"blocks.{i}.attn.hook_head_out"] for i in range(n_layer)]  # (N, H, T, hd) each
    to_output_projection = cache[f"blocks.{AGGREGATION_LAYER}.attn.hook_head_out_post"]  # (N, H, T, hd): what W_O gets
    rate_by_layer, rate = sink_rate(patterns)
    return {
        "first_token_attention": [float(first_token_attention(p).mean()) for p in patterns],
        "sink_rate_by_layer": rate_by_layer, "sink_rate": rate,
        "dominance_ratio_token0": [float(token0_dominance_by_window(r).mean()) for r in normalised],  # as the paper
        "effective_rank": [mean_effective_rank(r) for r in resid],
        # within one token; before the head-wise norm or gate, since after it the head-wise curve is flat by construction
        "var_by_position": variance_by_position(head_outs[AGGREGATION_LAYER])[1].tolist(),
        "var_by_position_after_norm": variance_by_position(to_output_projection)[1].tolist(),
        "head_entropy": [attention_entropy_by_head(p).tolist() for p in patterns],
        "head_output_variance": [head_output_variance(h).tolist() for h in head_outs],
        # the slot's share of each query's weight (B, H, T) per layer, where there is a slot; the patterns and the
        # sink rate above are over the real keys, Gu et al.'s formula (each row over its sum)
        "slot_share": [float(cache[f"blocks.{i}.attn.hook_slot"].mean()) for i in range(n_layer)]
                      if model.config.attn in SLOT_VARIANTS else None,
    }


def mean_over_seeds(per_seed):
    """A list (over seeds) of equally long lists -> their elementwise mean, as a list."""
    return np.mean(per_seed, axis=0).tolist()


def uniform_attention_to_token0(block_size):
    """Key 0's share under uniform causal attention, the mean over queries t >= 1 of 1 / (t + 1)."""
    return float(np.mean([1 / (t + 1) for t in range(1, block_size)]))


# ----------------------------------------------------------------------------- the time it will take

def is_cached(profile, attn, seed, data, device, out_dir, steps=None, compile=None, snapshots=0):
    """This very run (its configs, data and environment) is in the cache with its snapshots; an older recipe's
    file is not."""
    path = checkpoint_path(profile, attn, seed, data, device, out_dir, steps, compile)[0]
    return in_cache(path, profile_configs(profile, attn, seed, steps)[1].steps, snapshots)


def step_plan(arm, profile, data, device, micro_batch=None, steps=None, compile=None):
    """How this arm's training will run here: training.planned_step on a fresh model (micro-batch, compiled, speed)."""
    model_cfg, train_cfg = profile_configs(profile, arm, steps=steps)
    return planned_step(GPT(model_cfg).to(device), data, train_cfg, micro_batch, compile)


def training_options(run, steps):
    """What trained_model and is_cached take besides the profile, arm and seed."""
    return dict(data=run.dataset, device=run.device, out_dir=run.out_dir, steps=steps, compile=run.compile,
                snapshots=run.snapshots)


def training_estimate(run, variants, seeds, steps):
    """Each arm's step as its training will run it, and the expected time of every run still to train."""
    model_cfg, train_cfg = profile_configs(run.profile, steps=steps)
    options = training_options(run, steps)
    to_train = [(v, s) for v in variants for s in seeds if not is_cached(run.profile, v, s, **options)]
    plans = {v: step_plan(v, run.profile, run.dataset, run.device, run.micro_batch, steps, run.compile)
             for v in dict.fromkeys(v for v, _ in to_train)}
    return {"plans": {v: plan.describe(train_cfg, model_cfg.block_size) for v, plan in plans.items()},
            "runs": len(variants) * len(seeds), "to_train": len(to_train), "profile": run.profile,
            "steps": train_cfg.steps, "batch_size": train_cfg.batch_size, "block_size": model_cfg.block_size,
            "minutes": sum(plans[v].minutes(train_cfg, model_cfg.block_size) for v, _ in to_train)}


# ----------------------------------------------------------------------------- the paper's steps

def train_and_analyse(run, variants, seeds, steps, rank):
    """Every variant and seed, from the cache or trained now; on rank 0, each model's validation curve and
    its measures (analyse) on the same held-out windows -> {"val_steps", "curves": {variant: {seed: losses}},
    "analyses": {variant: [one per seed]}}. Under torchrun the other ranks only train."""
    bos = profile_configs(run.profile, steps=steps)[1].bos
    x, _ = run.dataset.windows("val", N_WINDOWS, bos, torch.Generator().manual_seed(run.seed))  # (N, T)
    curves, analyses, grown, costs = {}, {}, {}, []
    for seed in seeds:  # a paired design: within a seed, every variant sees the same windows in the same order
        for variant in variants:
            model, history = trained_model(run.profile, variant, seed, **training_options(run, steps),
                                           micro_batch=run.micro_batch)
            if rank == 0:
                curves.setdefault(variant, {})[str(seed)] = history["val_loss"]
                analyses.setdefault(variant, []).append(analyse(model.eval(), x.to(run.device)))
                if run.snapshots:  # the chain at every snapshot of this training (cli.emergence)
                    grown.setdefault(variant, {})[str(seed)], cost = emergence(run, variant, seed, x.to(run.device),
                                                                                bos, steps)
                    costs.append(cost)
    return {"val_steps": history["val_step"], "curves": curves, "analyses": analyses,  # the same steps for every run
            "emergence": grown or None, "snapshot_costs": costs}


def paired_difference(a, b, j):
    """a minus b at evaluation j, paired by seed (a, b: (seeds, evaluations)): {"mean", "low", "high"}."""
    return dict(zip(("mean", "low", "high"), paired_interval(a[:, j], b[:, j])))


def seed_study(val_steps, curves, variants):
    """Each fix against the baseline, paired by seed: the loss difference at the middle evaluation and
    at the end with its 95 % t interval, and the steps each seed takes to reach its baseline's final loss;
    the same differences between head-wise RMSNorm's arms (HEAD_NORM_ABLATIONS), where both were trained."""
    mid = len(val_steps) // 2
    losses = {v: np.array(list(curves[v].values())) for v in variants}  # (seeds, evaluations) each
    study = {"mid_step": val_steps[mid], "final_step": val_steps[-1], "by_variant": {}, "ablations": {}}
    for v in variants:
        study["by_variant"][v] = {
            "steps_to_baseline_final_by_seed": [steps_to_reach(val_steps, own, base[-1])
                                                for own, base in zip(losses[v].tolist(), losses["softmax"].tolist())],
            **({} if v == "softmax" else {"minus_baseline_mid": paired_difference(losses[v], losses["softmax"], mid),
                                          "minus_baseline_final": paired_difference(losses[v], losses["softmax"], -1)}),
        }
    for name, (a, b) in HEAD_NORM_ABLATIONS.items():
        if a in variants and b in variants:
            study["ablations"][name] = {"mid": paired_difference(losses[a], losses[b], mid),
                                        "final": paired_difference(losses[a], losses[b], -1)}
    return study


def loss_study(val_steps, curves, variants):
    """Fig. 16: the validation curves, their mean over seeds, the final losses, the steps to the baseline's
    mean final loss, and the seed study."""
    final = {v: [curve[-1] for curve in curves[v].values()] for v in variants}
    target = float(np.mean(final["softmax"]))
    mean_curves = {v: mean_over_seeds(list(curves[v].values())) for v in variants}
    return {"val_loss_curves": curves, "val_loss_mean_curves": mean_curves, "val_loss_final": final,
            "baseline_final_val_loss": target,
            "steps_to_baseline_loss": {v: steps_to_reach(val_steps, mean_curves[v], target) for v in variants},
            "seed_study": seed_study(val_steps, curves, variants)}


def measures_by_variant(analyses, variants):
    """Each variant's measures by layer (or position), the mean over seeds; Gu et al.'s sink rate also by seed."""
    mean = lambda measure: {v: mean_over_seeds([a[measure] for a in analyses[v]]) for v in variants}
    return {"sink_threshold": SINK_THRESHOLD, "sink_rate_by_layer": mean("sink_rate_by_layer"),
            "sink_rate_by_seed": {v: [a["sink_rate"] for a in analyses[v]] for v in variants},
            "sink_rate_by_layer_by_seed": {v: [a["sink_rate_by_layer"] for a in analyses[v]] for v in variants},
            "first_token_attention_by_layer": mean("first_token_attention"),
            "dominance_ratio_token0_by_layer": mean("dominance_ratio_token0"),
            "effective_rank_by_layer": mean("effective_rank"), "var_by_position": mean("var_by_position"),
            "slot_share_by_layer": {v: mean_over_seeds([a["slot_share"] for a in analyses[v]]) for v in variants
                                    if analyses[v][0]["slot_share"] is not None},
            "var_by_position_after_norm": mean("var_by_position_after_norm")}


def baseline_heads(baseline):
    """Fig. 13 for the baseline of seed --seed (heads of different seeds do not correspond): each head's
    attention entropy and output variance, and their Spearman rank correlation over all heads."""
    return {"head_entropy": baseline["head_entropy"], "head_output_variance": baseline["head_output_variance"],
            "head_entropy_variance_spearman": rank_correlation(np.concatenate(baseline["head_entropy"]),
                                                               np.concatenate(baseline["head_output_variance"]))}


def summarise(trained, profile, steps, variants, seeds):
    """The metrics of train_and_analyse's curves and measures."""
    val_steps, analyses = trained["val_steps"], trained["analyses"]
    return {"n_windows": N_WINDOWS, "profile": profile, "steps": steps, "variants": variants, "seeds": seeds,
            "val_steps": val_steps,
            **loss_study(val_steps, trained["curves"], variants), **measures_by_variant(analyses, variants),
            **baseline_heads(analyses["softmax"][0]), "emergence": trained["emergence"]}


# ----------------------------------------------------------------------------- figures

def plot_val_loss(val_steps, curves, target, path):
    """Left: each variant's validation loss, mean and min-max band over seeds. Right: each fix minus
    the baseline, paired by seed, with its 95 % t interval over seeds."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    baseline = np.array(list(curves["softmax"].values()))  # (seeds, evaluations)
    for variant, by_seed in curves.items():
        losses = np.array(list(by_seed.values()))  # (seeds, evaluations)
        left.plot(val_steps, losses.mean(0), color=COLORS[variant], label=f"{LABELS[variant]} (mean of {len(losses)})")
        left.fill_between(val_steps, losses.min(0), losses.max(0), color=COLORS[variant], alpha=0.2)
        if variant != "softmax":
            mean_low_high = np.array([paired_interval(losses[:, j], baseline[:, j]) for j in range(len(val_steps))],
                                     dtype=float)  # (evaluations, 3); one seed: no interval, NaN bands are not drawn
            right.plot(val_steps, mean_low_high[:, 0], color=COLORS[variant], label=LABELS[variant])
            right.fill_between(val_steps, mean_low_high[:, 1], mean_low_high[:, 2], color=COLORS[variant], alpha=0.2)
    left.axhline(target, color="gray", linestyle=":", label="baseline's final loss")
    top = max(np.array(list(c.values()))[:, 1:].max() for c in curves.values())  # leave out step 0 (about ln 257)
    left.set(ylim=(None, top * 1.02), xlabel="training step", ylabel="validation loss (nats per byte)",
             title="Fig. 16: validation loss, mean and min-max over seeds")
    left.legend()
    right.axhline(0, color="tab:red", linewidth=0.8, label="baseline")
    right.set(xlabel="training step", ylabel="loss minus the baseline's, same seed (nats)",
              title="paired difference, 95 % t interval over seeds")
    right.set_xlim(val_steps[1], val_steps[-1])  # step 0: every model is at about ln 257
    right.legend()
    save_figure(fig, path)


def plot_by_layer(values, ylabel, title, path, reference=None, first_label="layer"):
    """One line per variant over layers; reference: (y, label) drawn dotted."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, by_layer in values.items():
        ax.plot(range(len(by_layer)), by_layer, "o-", color=COLORS[variant], label=LABELS[variant])
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle=":", label=reference[1])
    ax.set(xlabel=first_label, ylabel=ylabel, title=title, xticks=range(len(next(iter(values.values())))))
    ax.set_ylim(bottom=0)
    ax.legend()
    save_figure(fig, path)


def plot_variance_by_position(after, before, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, values, where in ((axes[0], before, "value aggregation o_t (hook_head_out)"),
                              (axes[1], after, "after head-wise norm / gate: W_O's input (hook_head_out_post)")):
        for variant, by_position in values.items():
            ax.plot(by_position, color=COLORS[variant], label=LABELS[variant])
        ax.set(yscale="log", xlabel="position t", title=where)
    axes[0].set_ylabel(f"variance within a token, layer {AGGREGATION_LAYER}")
    axes[0].legend()
    fig.suptitle("Fig. 23: position-wise variance of the aggregation output")
    save_figure(fig, path)


def draw(metrics, model_cfg, run):
    """Figs. 2, 13, 14, 15, 16 and 23, and the sink rate by layer, in the run's folder."""
    T = model_cfg.block_size
    stream = "residual stream entering block i (i = n_layer: leaving the last)"
    plot_val_loss(metrics["val_steps"], metrics["val_loss_curves"], metrics["baseline_final_val_loss"],
                  run.path("fig16_val_loss.png"))
    plot_by_layer(metrics["first_token_attention_by_layer"], "mean attention to token 0",
                  "Fig. 2: attention to the first token by layer", run.path("fig02_first_token_attention.png"),
                  reference=(uniform_attention_to_token0(T), "uniform causal attention"))
    plot_by_layer(metrics["sink_rate_by_layer"], f"share of (window, head) with alpha > {SINK_THRESHOLD}",
                  "Gu et al.'s sink rate by layer, mean over seeds", run.path("fig02_sink_rate.png"))
    plot_by_layer(metrics["dominance_ratio_token0_by_layer"], "token 0's dominance ratio max|x| / mean|x|",
                  "Fig. 14: token 0's dominance ratio after RMSNorm", run.path("fig14_dominance_ratio.png"),
                  first_label="layer (input of block i, after its RMSNorm)")
    plot_by_layer(metrics["effective_rank_by_layer"], "effective rank of (T, C) hidden states",
                  "Fig. 15: effective rank", run.path("fig15_effective_rank.png"),
                  reference=(model_cfg.n_embd, f"n_embd = {model_cfg.n_embd}"), first_label=stream)
    plot_variance_by_position(metrics["var_by_position_after_norm"], metrics["var_by_position"],
                              run.path("fig23_variance_by_position.png"))
    if metrics["emergence"] is not None:
        plot_emergence({LABELS[v]: list(by_seed.values()) for v, by_seed in metrics["emergence"].items()},
                       {LABELS[v]: COLORS[v] for v in metrics["emergence"]},
                       f"The chain as it grows: {run.profile}, every arm, {len(metrics['seeds'])} seed(s)",
                       run.path("fig_emergence.png"))
    entropy = metrics["head_entropy"]
    head_names = [f"L{i}H{h}" for i, layer in enumerate(entropy) for h in range(len(layer))]
    plot_head_entropy(head_names, np.concatenate(entropy), np.concatenate(metrics["head_output_variance"]),
                      float(np.mean([np.log(t + 1) for t in range(1, T)])),
                      "Fig. 13: head entropy vs output variance (baseline)",
                      run.path("fig13_head_entropy_variance.png"))


# ----------------------------------------------------------------------------- printing

def mean_std_text(values):
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def interval_text(d):
    return f"{d['mean']:+.4f}" + ("" if d["low"] is None else f" [{d['low']:+.4f}, {d['high']:+.4f}]")


def steps_text(study):
    """Steps to the baseline's final loss, one entry per seed ('-': never within the budget)."""
    return " ".join("-" if s is None else str(s) for s in study["steps_to_baseline_final_by_seed"])


def report_estimate(estimate):
    """The planned step of each arm still to train, and the time all of them will take."""
    for v, plan in estimate["plans"].items():
        print(f"{v}: {plan}")
    print(f"{estimate['runs']} runs ({estimate['profile']} profile, {estimate['steps']} steps x "
          f"{estimate['batch_size']} x {estimate['block_size']} tokens each), {estimate['to_train']} to train: "
          f"expected time about {duration_text(estimate['minutes'])} in all (an estimate)")


def print_claims(metrics, variants):
    """One line per claim of the paper: the numbers, and whether the claim holds here. The loss claims
    come from the paired interval over seeds; the sink claims from Gu et al.'s sink rate."""
    rate, seeds = metrics["sink_rate_by_seed"], metrics["seeds"]
    dominance, rank = metrics["dominance_ratio_token0_by_layer"], metrics["effective_rank_by_layer"]
    study = metrics["seed_study"]
    baseline_layers = metrics["sink_rate_by_layer_by_seed"]["softmax"]
    print(f"\nThe paper's claims at this scale ({len(seeds)} seed(s); {SINK_RATE_NAME}; a model has a sink when a "
          f"layer has a rate of at least {SINK_LAYER_SHARE}, ours, as 01 finds it):")
    sink_seeds = [has_sink(by_layer) for by_layer in baseline_layers]
    print(f"  baseline sink rate {np.mean(rate['softmax']):.1%} (by seed {', '.join(f'{r:.0%}' for r in rate['softmax'])}; "
          f"its largest layer {', '.join(f'{max(by_layer):.0%}' for by_layer in baseline_layers)}): "
          + ("a sink in every seed" if all(sink_seeds) else
             f"a sink in {sum(sink_seeds)} of {len(seeds)} seeds" if any(sink_seeds) else "no sink to remove"))
    for v in (v for v in variants if v != "softmax"):
        removed = [removes_sink(b, r) for b, r in zip(baseline_layers, rate[v])]
        drop = ", ".join(f"{b:.0%} -> {r:.0%}" for b, r in zip(rate["softmax"], rate[v]))
        verdict = ("" if not any(sink_seeds) else " -> removes the sink" if all(removed) else
                   f" -> removes the sink in {sum(removed)} of {sum(sink_seeds)} seeds with one" if any(removed) else
                   " -> does not remove the sink")
        print(f"  {LABELS[v]}: sink rate by seed, baseline -> fix: {drop}{verdict}"
              + (" (the rule: not one sink head in any window, in a seed whose baseline has a sink)" if verdict else ""))
        s = study["by_variant"][v]
        mid = interval_verdict(s["minus_baseline_mid"]["low"], s["minus_baseline_mid"]["high"], "faster", "slower")
        end = interval_verdict(s["minus_baseline_final"]["low"], s["minus_baseline_final"]["high"], "lower", "higher")
        print(f"      loss minus baseline, paired, 95 % t interval: at step {study['mid_step']} "
              f"{interval_text(s['minus_baseline_mid'])} -> {mid}; at the end (step {study['final_step']}) "
              f"{interval_text(s['minus_baseline_final'])} -> {end}")
    if "headwise" in variants:
        lower_dominance = max(dominance["headwise"]) < max(dominance["softmax"])
        higher_rank = min(rank["headwise"]) > min(rank["softmax"])
        print(f"  head-wise max dominance {max(dominance['headwise']):.2f} vs baseline "
              f"{max(dominance['softmax']):.2f}, min effective rank {min(rank['headwise']):.1f} vs "
              f"{min(rank['softmax']):.1f} (means over seeds) -> "
              + ("holds" if lower_dominance and higher_rank else "does not hold") + " here")
    for name, pair in study["ablations"].items():
        mid, end = pair["mid"], pair["final"]
        print(f"  head-wise, {name}, paired: at step {study['mid_step']} {interval_text(mid)} -> "
              f"{interval_verdict(mid['low'], mid['high'], 'faster', 'slower')}; at the end {interval_text(end)} -> "
              f"{interval_verdict(end['low'], end['high'], 'lower', 'higher')}")
    print(f"  Fig. 13, baseline heads: Spearman rank correlation of entropy and output variance "
          f"{metrics['head_entropy_variance_spearman']:+.2f} (paper: negative, low entropy gives high variance)")


def report_emergence(metrics, costs):
    """The chain as each arm grew: the first seed's table per arm, the order in every seed, and the snapshots' cost."""
    if metrics["emergence"] is None:
        print("\nno snapshots (--snapshots 0): the chain is not followed through training")
        return
    print_link_bars()
    for v, by_seed in metrics["emergence"].items():
        first = next(iter(by_seed))
        print_emergence_table(f"{LABELS[v]}, seed {first}", by_seed[first])
        for seed, result in by_seed.items():
            print(order_text(f"{LABELS[v]}, seed {seed}", result))
    print(f"\n{len(costs)} trainings: {cost_text(costs)} (fig_emergence.png)")


def report(metrics, block_size):
    """The table of variants, the validation curves, and the paper's claims."""
    variants, seeds, mean_curves = metrics["variants"], metrics["seeds"], metrics["val_loss_mean_curves"]
    print(f"\n{metrics['profile']} profile, {len(seeds)} seed(s) {seeds}, {metrics['steps']} steps; measures on "
          f"{metrics['n_windows']} held-out windows, mean over seeds (uniform attention to token 0: "
          f"{uniform_attention_to_token0(block_size):.3f})")
    slot = metrics["slot_share_by_layer"]
    print_table([[LABELS[v], mean_std_text(metrics["val_loss_final"][v]),
                  steps_text(metrics["seed_study"]["by_variant"][v]),
                  float(np.mean(metrics["sink_rate_by_seed"][v])), max(metrics["first_token_attention_by_layer"][v]),
                  max(metrics["dominance_ratio_token0_by_layer"][v]), min(metrics["effective_rank_by_layer"][v]),
                  float(np.mean(slot[v])) if v in slot else "-"]
                 for v in variants],
                ["variant", "final val loss", "steps to own seed's baseline final", "sink rate", "max attn to token 0",
                 "max dominance 0", "min eff. rank", "slot share"])
    if slot:
        print("(sink rate and attention to token 0: over the real keys, each row over its sum, Gu et al.'s formula; "
              "slot share: the weight each query puts on the slot, mean over layers)")
    print("\nvalidation loss by evaluated step (mean over seeds; each seed in metrics.json, val_loss_curves)")
    print_table([[step] + [mean_curves[v][j] for v in variants] for j, step in enumerate(metrics["val_steps"])],
                ["step"] + [LABELS[v] for v in variants])
    print_claims(metrics, variants)


# ----------------------------------------------------------------------------- main

def parse_variants(text):
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ARMS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)} in --variants; valid: {', '.join(ARMS)}")
    if "softmax" not in variants:
        raise InputError("--variants must include softmax: the baseline every comparison is made against")
    return [v for v in ARMS if v in variants]  # the usual order, each once


def parse_args(argv):
    """The command line -> (args, variants)."""
    parser = script_parser(__doc__, cpu_profile=DEFAULT_PROFILE, pretrained=False)
    parser.add_argument("--variants", default=",".join(PAPER_VARIANTS),
                        help=f"comma-separated, softmax included, of {', '.join(ARMS)} "
                             f"(default: {','.join(PAPER_VARIANTS)}, the paper's; the field's fixes: "
                             f"{','.join(SLOT_VARIANTS)})")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per variant: --seed, --seed + 1, ... (default 1: four models with the default "
                             "--variants; 3 or more give the seed study its intervals)")
    parser.add_argument("--steps", type=int, default=None,
                        help="a step budget other than the profile's, evaluated 10 times (the seed study's)")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: train at least one seed")
    return args, variants


def setup_run(args, argv):
    """cli.setup, then this process's device (under torchrun: its rank's GPU) and a folder per profile and
    step budget -> (run, rank)."""
    run = setup(args, __file__, cpu_profile=DEFAULT_PROFILE, torchrun=True, argv=argv)
    device, rank, _ = init_distributed(run.device)  # without torchrun: the device unchanged, rank 0
    folder = os.path.join(run.folder, run.profile + (f"-{args.steps}steps" if args.steps else ""))
    make_folder(folder, run.out_dir)
    return replace(run, folder=folder, device=device), rank


def main(argv=None) -> dict:
    args, variants = parse_args(argv)
    run, rank = setup_run(args, argv)
    model_cfg, train_cfg = profile_configs(run.profile, steps=args.steps)
    seeds = [run.seed + i for i in range(args.seeds)]
    if rank == 0:  # the estimate, for every run still to train
        report_estimate(training_estimate(run, variants, seeds, args.steps))
    trained = train_and_analyse(run, variants, seeds, args.steps, rank)
    close_distributed()  # training is over: rank 0 alone writes and prints
    if rank != 0:
        return {}
    metrics = write_metrics(summarise(trained, run.profile, train_cfg.steps, variants, seeds), run)
    draw(metrics, model_cfg, run)
    report(metrics, model_cfg.block_size)
    report_emergence(metrics, trained["snapshot_costs"])
    return metrics


if __name__ == "__main__":
    run_script(main)

"""The paper's claims on the models we train: the `cpu` model (no BOS), measured by the scripts 01-04 on
64 held-out windows, and 05's fixes on the `cpu_bos` recipe, whose baseline grows a sink.

The same seed trains a different model on another machine: floating-point results differ across CPUs.
So a claim about a trained model is judged over seeds, and the two groups split the claims by what
seeds 0-2 showed on our machine (docs/results.md, "Every claim, by seed"):
  - `claims` (CI; seed CLAIMS_SEED, 0 by default): a claim that held in every seed is asserted; one that
    failed in every seed is a strict expected failure whose reason gives the range over the seeds;
  - `claims_long` (seeds 0-2; hours of training on 2 cores, README's tests table): a claim that held in some seeds
    and not in others is asserted in every seed, and marked not held with its count; and the fixes the
    field ships (a slot in each head's softmax) removing the sink, over seeds 0-2 of cpu_bos.
Run: pytest -m claims tests/test_claims.py,  pytest -m claims_long tests/test_claims.py
"""
import os

import pytest
import torch

from cli import pick_device
from conftest import CLAIMS_SEED, ROOT, claim_not_held, load_script
from data import ByteData, load_corpus
from measures import (DIRECTION_COSINE, DOMINANCE_RATIO, MASK_UNIT_GAIN, MASSIVE_RATIO, SINK_LAYER_SHARE, SINK_THRESHOLD,
                      TOKEN0_UNIT_RATIO, direction_from_layer, first_sink_layer, removes_sink, token0_massive_over_others)
from training import profile_configs, trained_model

OUT = os.path.join(ROOT, "out")
SEEDS = (0, 1, 2)
SCRIPTS = ("01_variance", "02_super_neurons", "03_dimension_disparity", "04_interventions")
FIXES = ("headwise", "sigmoid")
_measured = {}  # ("scripts", seed) or ("fixes", variant, n_seeds) -> metrics: each runs once per test session


def out_dir(seed):
    """Seed 0 writes where a user's run writes (out/); other seeds to out/seeds/<seed>/. All share the cache."""
    if seed == 0:
        return OUT
    folder = os.path.join(OUT, "seeds", str(seed))
    os.makedirs(os.path.join(OUT, "checkpoints"), exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, "checkpoints")):
        os.symlink(os.path.join(OUT, "checkpoints"), os.path.join(folder, "checkpoints"))
    return folder


def scripts(seed):
    """01-04 on the cpu model of this seed (trained once, then cached): {script: metrics}."""
    if ("scripts", seed) not in _measured:
        flags = ["--profile", "cpu", "--seed", str(seed), "--out_dir", out_dir(seed)]
        _measured["scripts", seed] = {name: load_script(f"{name}.py").main(flags) for name in SCRIPTS}
    return _measured["scripts", seed]


def massive_ratio_by_layer(seed):
    """Token 0's max/median |x| over the others', in the residual stream after each layer (Sun et al.)."""
    model_cfg, train_cfg = profile_configs("cpu")
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    model, _ = trained_model("cpu", "softmax", seed, data, pick_device(), out_dir(seed))  # the scripts' device
    x, _ = data.windows("val", 64, train_cfg.bos, torch.Generator().manual_seed(seed))  # the scripts' windows
    names = [f"blocks.{i}.hook_resid_in" for i in range(1, model_cfg.n_layer)] + ["hook_resid_final"]
    _, cache = model.eval().run_with_cache(x.to(pick_device()), record=names)  # {name: (N, T, C)}
    return [token0_massive_over_others(cache[n]) for n in names]


def fixes(variant, n_seeds):
    """05 on cpu_bos: the baseline and one fix, seeds 0 .. n_seeds - 1: its metrics."""
    if ("fixes", variant, n_seeds) not in _measured:
        _measured["fixes", variant, n_seeds] = load_script("05_pretrain_headwise.py").main(
            ["--profile", "cpu_bos", "--seeds", str(n_seeds), "--variants", f"softmax,{variant}", "--out_dir", OUT])
    return _measured["fixes", variant, n_seeds]


# ----------------------------------------------------------------------------- the claims, one seed each
# Each takes a seed and returns (held, what was measured).

def variance_above_the_others(case):
    def claim(seed):
        ratio = scripts(seed)["01_variance"]["var_ratio_token0"][case]
        return ratio > 1, f"token 0's variance over the others' ({case}, layer 0, across windows): {ratio:.2f}"
    return claim


def a_sink_in_a_layer_from_1_on(seed):
    rate = scripts(seed)["01_variance"]["sink_rate_by_layer"]
    return first_sink_layer(rate, from_layer=1) is not None, (
        f"Gu et al.'s sink rate by layer {[round(r, 3) for r in rate]} (a sink layer: at least {SINK_LAYER_SHARE})")


def the_sink_follows_the_norm_spike(seed):
    m = scripts(seed)["01_variance"]
    return m["sink_follows_spike"], f"norm spike in layer {m['spike_layer']}, first sink layer {m['sink_layer']}"


def a_super_neuron_fires_10x_on_token_0(seed):
    best = max(scripts(seed)["02_super_neurons"]["super_neurons"], key=lambda s: s["token0_activation_ratio"])
    return (best["token0_activation_ratio"] >= TOKEN0_UNIT_RATIO,
            f"the strongest of 02's super neurons (layer {best['layer']} unit {best['unit']}) fires "
            f"{best['token0_activation_ratio']:.1f}x")


def a_massive_activation_on_token_0(seed):
    ratios = massive_ratio_by_layer(seed)
    return max(ratios) >= MASSIVE_RATIO, f"token 0's max/median over the others' after each layer: {[round(r, 1) for r in ratios]}"


def dominance_10x_the_others(seed):
    m = scripts(seed)["03_dimension_disparity"]
    ratios = [a / b for a, b in zip(m["dominance_ratio_token0_by_layer"], m["dominance_ratio_others_by_layer"])]
    return max(ratios) >= DOMINANCE_RATIO, f"token 0's dominance ratio over the others' by layer: {[round(r, 2) for r in ratios]}"


def a_fixed_direction_after_the_spike(seed):
    m = scripts(seed)["03_dimension_disparity"]
    lowest = direction_from_layer(m["token0_direction_cosine_by_layer"], m["spike_layer"])  # 03's: or the largest ratio
    return lowest >= DIRECTION_COSINE, (f"token 0's direction cosine from the spike (layer {m['spike_layer']}) on: "
                                        f"{m['token0_direction_cosine_by_layer'][m['spike_layer']:]}")


def a_unit_fires_10x_on_token_0(seed):
    u = scripts(seed)["04_interventions"]["token0_unit"]
    return u["token0_ratio"] >= TOKEN0_UNIT_RATIO, f"the token-0 unit (layer {u['layer']} unit {u['unit']}) fires {u['token0_ratio']:.1f}x"


def the_mask_makes_it_fire_at_k_5x(seed):
    u = scripts(seed)["04_interventions"]["token0_unit"]
    gain = u["at_k_masked"] / max(u["at_k_unmasked"], 1e-12)
    return gain >= MASK_UNIT_GAIN, f"the token-0 unit at k: {u['at_k_unmasked']:.3g} unmasked, {u['at_k_masked']:.3g} masked ({gain:.1f}x)"


def the_mask_moves_the_sink_to_k(seed):
    m = scripts(seed)["04_interventions"]
    k = m["k"]
    received, unmasked = m["attention_received_masked"][k], m["attention_received_baseline"][k]
    return m["mask_peak_moved_to_k"], (f"peak of attention received under the mask at {m['mask_peak']}; k = {k} "
                                       f"receives {received:.3f} ({unmasked:.3f} unmasked)")


def amplification_makes_a_sink(seed):
    attention = scripts(seed)["04_interventions"]["attention_to_k_variance"]
    return attention[-1] >= SINK_THRESHOLD, f"attention to k by lambda (main reading): {[round(a, 3) for a in attention]}"


def variance_not_norm_moves_k(seed):
    m = scripts(seed)["04_interventions"]
    top = {arm: m[f"attention_to_k_{arm}"][-1] for arm in ("variance", "scale_control", "shift_control")}
    return top["variance"] >= 3 * max(top["scale_control"], top["shift_control"]), f"at lambda = 32: {top}"


def the_fix_removes_the_sink(variant, n_seeds):
    """Gu et al.'s sink rate: the baseline has a sink (measures.has_sink: a sink layer), the fix no sink head."""
    def claim(seed):
        m = fixes(variant, n_seeds)
        rate, baseline_layers = m["sink_rate_by_seed"], m["sink_rate_by_layer_by_seed"]["softmax"][seed]
        return removes_sink(baseline_layers, rate[variant][seed]), (
            f"Gu et al.'s sink rate (a head with alpha > {SINK_THRESHOLD} in a window): softmax "
            f"{rate['softmax'][seed]:.3f} (largest layer {max(baseline_layers):.3f}; a sink at {SINK_LAYER_SHARE}), "
            f"{variant} {rate[variant][seed]:.3f}")
    return claim


CLAIMS = {
    "token 0's variance above the others' at init": variance_above_the_others("init"),
    "token 0's variance above the others' trained, on text": variance_above_the_others("trained"),
    "token 0's variance above the others' trained, on random tokens": variance_above_the_others("random_tokens"),
    "a sink in a layer from 1 on": a_sink_in_a_layer_from_1_on,
    "the sink follows the norm spike within one layer": the_sink_follows_the_norm_spike,
    "a super neuron fires 10x on token 0": a_super_neuron_fires_10x_on_token_0,
    "a massive activation on token 0, 10x the others'": a_massive_activation_on_token_0,
    "token 0's dominance ratio 10x the others'": dominance_10x_the_others,
    "token 0's direction fixed (cosine 0.9) from the spike on": a_fixed_direction_after_the_spike,
    "a unit fires 10x on token 0": a_unit_fires_10x_on_token_0,
    "the mask makes it fire at k 5x": the_mask_makes_it_fire_at_k_5x,
    "the mask moves the sink to k": the_mask_moves_the_sink_to_k,
    "variance amplification makes a sink at k": amplification_makes_a_sink,
    "variance, not norm, moves attention to k (3x both controls)": variance_not_norm_moves_k,
}
FIX_CLAIMS = {f"{variant} removes the sink": variant for variant in FIXES}

# What seeds 0-2 showed here (docs/results.md, "Every claim, by seed"): the claims that failed in every seed,
# with their range, and those whose outcome differed between seeds, with their count.
FAILED_IN_EVERY_SEED = {
    "a sink in a layer from 1 on": "seeds 0-2: Gu et al.'s sink rate at most 0.086 in any layer (seed 0, layer 2; 0 in "
                                   "seeds 1 and 2), attention to token 0 at most 0.040-0.075",
    "the sink follows the norm spike within one layer": "seeds 0-2: no sink layer; a norm spike (2x) only in seed 0 "
                                                        "(3.3x entering layer 2)",
    "a massive activation on token 0, 10x the others'": "seeds 0-2: token 0's max/median at most 1.8-2.7x the others'",
    "token 0's dominance ratio 10x the others'": "seeds 0-2: at most 1.01-2.15x the others' after RMSNorm",
    "token 0's direction fixed (cosine 0.9) from the spike on": "seeds 0-2: token 0's direction cosine 0.64-0.88 "
                                                                "from layer 2 on",
    "the mask moves the sink to k": "seeds 0-2: the peak under the mask stays at 54-55; k receives 0.021-0.034 "
                                    "(0.022-0.024 unmasked)",
    "variance amplification makes a sink at k": "seeds 0-2: attention to k at lambda = 32 is 0.054-0.103",
    "headwise removes the sink": "seeds 0-2, calibrated gain: head-wise keeps a sink rate of 8 % / 12 % / 8 %, "
                                 "mostly in layer 2 (baseline: 29 % / 18 % / 30 %)",
    "sigmoid removes the sink": "seeds 0-2: sigmoid keeps a sink rate of 0.13 % / 0.26 % / 8.3 % (one or two "
                                "window-head pairs of 768 in seeds 0 and 1; baseline: 29 % / 18 % / 30 %)",
}
DIFFERS_BETWEEN_SEEDS = {
    "a super neuron fires 10x on token 0": "held in 2 of seeds 0-2: the strongest unit 02 lists fires 45x, 1.4x, 13.9x",
    "a unit fires 10x on token 0": "held in 2 of seeds 0-2: 45x, 7.2x, 13.3x",
    "the mask makes it fire at k 5x": "held in 2 of seeds 0-2: 39.7x, 3.7x, 23.4x",
    "variance, not norm, moves attention to k (3x both controls)": "held in 1 of seeds 0-2: the variance arm gives k "
                                                                   "1.9x, 4.5x, 1.1x the larger control at lambda = 32",
}


def ci_param(name):
    if name in DIFFERS_BETWEEN_SEEDS:
        return None
    marks = [claim_not_held(FAILED_IN_EVERY_SEED[name])] if name in FAILED_IN_EVERY_SEED else []
    return pytest.param(name, marks=marks, id=name)


def long_param(name):
    return pytest.param(name, marks=[claim_not_held(DIFFERS_BETWEEN_SEEDS[name])], id=name)


@pytest.mark.claims
@pytest.mark.parametrize("name", [p for p in map(ci_param, CLAIMS) if p])
def test_claim_on_the_cpu_model(name):
    held, measured = CLAIMS[name](CLAIMS_SEED)
    assert held, f"seed {CLAIMS_SEED}: {measured}"


@pytest.mark.claims
@pytest.mark.parametrize("name", [p for p in map(ci_param, FIX_CLAIMS) if p])
def test_fix_on_the_cpu_bos_model(name):
    held, measured = the_fix_removes_the_sink(FIX_CLAIMS[name], 1)(0)
    assert held, f"seed 0: {measured}"


@pytest.mark.claims_long
@pytest.mark.parametrize("name", [long_param(n) for n in list(CLAIMS) + list(FIX_CLAIMS) if n in DIFFERS_BETWEEN_SEEDS])
def test_claim_in_every_seed(name):
    claim = CLAIMS[name] if name in CLAIMS else the_fix_removes_the_sink(FIX_CLAIMS[name], len(SEEDS))
    results = [claim(seed) for seed in SEEDS]
    assert all(held for held, _ in results), "; ".join(f"seed {s}: {m}" for s, (_, m) in zip(SEEDS, results))


# ----------------------------------------------------------------------------- the fixes the field ships (claims_long)
# The paper's chain predicts that a slot in each head's softmax takes over the sink's job, so the sink goes.
# Judged by the same rule as the paper's fixes (measures.removes_sink), over seeds 0-2 of cpu_bos; not run by CI.
SLOT_FIXES_MEASURED = {
    "sink_logit": "seeds 0-2: sink rate 7.4 % / 1.2 % / 1.7 % (baseline 29 % / 18 % / 30 %; a sink layer in seeds 0 "
                  "and 2), largest layer 0.22 / 0.04 / 0.05, the slot taking 39 % of the weight",
    "softmax1": "seeds 0-2: sink rate 16 % / 16 % / 9 %, a layer-2 sink head kept (largest layer 0.25-0.27)",
    "kv_bias": "seeds 0-2: sink rate 0.13 % / 1.7 % / 1.8 % (one window-head pair of 768 in seed 0), largest layer "
               "0.004 / 0.04 / 0.05",
}


@pytest.mark.claims_long
@pytest.mark.parametrize("variant", [pytest.param(v, marks=[claim_not_held(m)], id=v)
                                     for v, m in SLOT_FIXES_MEASURED.items()])
def test_a_slot_fix_removes_the_sink_in_every_seed(variant):
    claim = the_fix_removes_the_sink(variant, len(SEEDS))
    results = [claim(seed) for seed in SEEDS]
    assert all(held for held, _ in results), "; ".join(f"seed {s}: {m}" for s, (_, m) in zip(SEEDS, results))

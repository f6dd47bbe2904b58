"""Tests of 03_dimension_disparity.py and 04_interventions.py: the scripts through main(["--quick"]),
their measures on inputs with known answers, and (group `claims`) the paper's claims on the
trained cpu-profile model."""
import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

from conftest import CLAIMS_SEED, ROOT, claim_not_held, load_script, numbers_in
from data import ByteData, load_corpus
from cli import record
from measures import attention_entropy_by_head, attention_received, dominance_ratio, effective_rank
from model import GPT, InputError, self_only_mask
from training import profile_configs, trained_model

dimension_disparity = load_script("03_dimension_disparity.py")
interventions = load_script("04_interventions.py")

KEYS = {
    "03_dimension_disparity": ["dominance_ratio_token0_by_layer", "dominance_ratio_others_by_layer",
                               "token0_direction_cosine_by_layer", "qk_alignment_by_head",
                               "positive_score_ratio_by_head", "effective_rank_by_layer"],
    "04_interventions": ["attention_received_baseline", "attention_received_masked", "k", "sink_moved_to_k",
                         "lambdas", "attention_to_k_variance", "attention_to_k_norm_control",
                         "attention_to_k_variance_own_mean", "attention_to_k_norm_control_own_mean",
                         "entropy_by_layer_baseline", "entropy_by_layer_masked",
                         "superneuron_activation_at_k", "dominance_ratio_at_k"],
}
SCRIPTS = {"03_dimension_disparity": dimension_disparity, "04_interventions": interventions}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Both scripts on the tiny profile, sharing one out dir, so the tiny model trains once."""
    out = tmp_path_factory.mktemp("out")
    return out, {name: script.main(["--quick", "--out_dir", str(out)]) for name, script in SCRIPTS.items()}


# ----------------------------------------------------------------------------- the scripts, --quick

@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_every_key_figures_and_finite_numbers(quick, name):
    out, results = quick
    folder = out / name
    on_disk = json.loads((folder / "metrics.json").read_text())
    assert on_disk == results[name]
    assert set(KEYS[name]) <= set(on_disk), set(KEYS[name]) - set(on_disk)
    assert all(math.isfinite(n) for n in numbers_in(on_disk))
    figures = list(folder.glob("*.png"))
    assert len(figures) >= 2 and all(f.stat().st_size > 0 for f in figures)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_seed_gives_identical_metrics(quick, name, tmp_path):
    """Trained again from scratch in an empty folder, not loaded from the first run's cache."""
    _, results = quick
    assert SCRIPTS[name].main(["--quick", "--out_dir", str(tmp_path)]) == results[name]


def test_03_dominance_is_measured_after_the_blocks_rmsnorm(quick):
    """As the paper measures it (Llama-2's 263 is after RMSNorm): on attn_norm(resid_in), gain included."""
    out, results = quick
    model, _ = trained_model("tiny", out_dir=str(out))
    model_cfg, train_cfg = profile_configs("tiny")
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    x, _ = data.windows("val", 64, train_cfg.bos, torch.Generator().manual_seed(0))  # the script's windows, seed 0
    with torch.no_grad(), model.eval().hooks(record="blocks.*.hook_resid_in") as cache:
        model(x)
        normalised = [block.attn_norm(cache[f"blocks.{i}.hook_resid_in"]) for i, block in enumerate(model.blocks)]
    expected = [float(dominance_ratio(n)[:, 0].mean()) for n in normalised]
    assert results["03_dimension_disparity"]["dominance_ratio_token0_by_layer"] == pytest.approx(expected, rel=1e-5)


def test_quick_03_shapes(quick):
    metrics = quick[1]["03_dimension_disparity"]
    n_layer, n_head = 2, 2  # the tiny profile
    assert len(metrics["dominance_ratio_token0_by_layer"]) == len(metrics["effective_rank_by_layer"]) == n_layer
    assert len(metrics["qk_alignment_by_head"]) == len(metrics["positive_score_ratio_by_head"]) == n_head
    assert all(0 <= a <= 1 for a in metrics["qk_alignment_by_head"] + metrics["positive_score_ratio_by_head"])


def test_quick_04_shapes_and_lambda_one_is_the_baseline(quick):
    metrics = quick[1]["04_interventions"]
    k = metrics["k"]
    assert k == 10 and len(metrics["attention_received_masked"]) == 32
    assert metrics["lambdas"] == [1, 2, 4, 8, 16, 32]
    for key in ("attention_to_k_variance", "attention_to_k_norm_control",
                "attention_to_k_variance_own_mean", "attention_to_k_norm_control_own_mean"):
        assert len(metrics[key]) == 6
        assert metrics[key][0] == pytest.approx(metrics["attention_received_baseline"][k], abs=1e-6)


@pytest.mark.parametrize("flags", [["--k", "32"], ["--k", "-1"], ["--k", "0"], ["--from_layer", "1"]])
def test_04_bad_k_or_layer_is_an_input_error(tmp_path, flags):
    with pytest.raises(InputError, match="--k|--from_layer"):
        interventions.main(["--quick", "--out_dir", str(tmp_path)] + flags)


# ----------------------------------------------------------------------------- measures, known answers

def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(7)) == pytest.approx(7, rel=1e-6)
    u, v = torch.randn(20, 1), torch.randn(1, 8)
    assert effective_rank(u @ v) == pytest.approx(1, abs=1e-4)


def test_dominance_ratio_of_one_hot_and_constant():
    D = 16
    assert float(dominance_ratio(torch.nn.functional.one_hot(torch.tensor(3), D).float())) == pytest.approx(D)
    assert float(dominance_ratio(torch.full((D,), -2.5))) == pytest.approx(1.0)


def test_mean_pairwise_cosine():
    direction = torch.randn(8)
    same = (0.1 + torch.rand(5, 1)) * direction  # (5, 8): one direction, different lengths
    assert float(dimension_disparity.mean_pairwise_cosine(same)) == pytest.approx(1, abs=1e-5)
    opposite = torch.stack([direction, -direction])
    assert float(dimension_disparity.mean_pairwise_cosine(opposite)) == pytest.approx(-1, abs=1e-5)
    by_position = torch.randn(4, 3, 8)  # (N, T, C): one cosine per position
    assert dimension_disparity.mean_pairwise_cosine(by_position).shape == (3,)


def test_attention_received_and_entropy_of_uniform_causal_attention():
    T = 6
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).view(T, 1)  # row t: 1 / (t + 1) on keys <= t
    pattern = uniform.expand(2, 3, T, T)
    expected = torch.tensor([sum(1 / (t + 1) for t in range(j + 1, T)) / max(T - j - 1, 1) for j in range(T)])
    expected[-1] = 0.0  # no query after the last key
    assert_close(attention_received(pattern), expected)
    expected_entropy = sum(math.log(t + 1) for t in range(1, T)) / (T - 1)
    assert float(attention_entropy_by_head(pattern).mean()) == pytest.approx(expected_entropy, rel=1e-6)


def test_the_masked_query_does_not_count_in_what_k_receives():
    """Under the self-only mask, row k is one-hot on k: weight k gives itself, not weight it receives."""
    T, k = 8, 3
    pattern = torch.tril(torch.ones(T, T))
    pattern[k + 1:, k] = 0.0  # no later query looks at k
    pattern[k] = 0.0
    pattern[k, k] = 1.0  # k attends only to itself
    pattern = (pattern / pattern.sum(-1, keepdim=True)).expand(2, 2, T, T)
    assert float(attention_received(pattern)[k]) == 0.0
    without_k = [t for t in range(1, T) if t != k]
    rows = pattern[0, 0, without_k]
    expected = float(-(rows * rows.clamp_min(1e-30).log()).sum(-1).mean())
    assert float(attention_entropy_by_head(pattern, skip=(k,)).mean()) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- interventions

@pytest.mark.parametrize("reading", ["positions", "own_mean"])
def test_amplification_and_its_control(reading):
    head_out, k = torch.randn(3, 2, 8, 4), 5  # (B, H, T, hd)
    for edit in (interventions.amplified, interventions.norm_matched):
        assert_close(edit(head_out, k, 1.0, reading), head_out, rtol=0, atol=1e-6)
    lam = 8.0
    amplified = interventions.amplified(head_out, k, lam, reading)
    control = interventions.norm_matched(head_out, k, lam, reading)
    others = [t for t in range(8) if t != k]
    assert torch.equal(amplified[:, :, others], head_out[:, :, others])
    mu = head_out.mean(dim=2) if reading == "positions" else head_out[:, :, k].mean(-1, keepdim=True)
    assert_close(amplified[:, :, k] - mu, lam * (head_out[:, :, k] - mu))  # the deviation grows by lambda
    assert_close(control[:, :, k].norm(dim=-1), amplified[:, :, k].norm(dim=-1))  # same norm
    cosine = torch.nn.functional.cosine_similarity(control[:, :, k], head_out[:, :, k], dim=-1)
    assert_close(cosine, torch.ones_like(cosine))  # same direction: only the norm changed


def test_lambda_one_edit_leaves_the_model_unchanged(tiny_config):
    model = GPT(tiny_config)
    x = torch.randint(256, (3, 16))
    for edit in (interventions.amplified, interventions.norm_matched):
        edits = {f"blocks.{i}.attn.hook_head_out": lambda h, e=edit: e(h, 5, 1.0, "positions") for i in range(2)}
        with torch.no_grad(), model.hooks(edit=edits):
            edited, _ = model(x)
        assert_close(edited, model(x)[0], rtol=0, atol=1e-5)


def test_masked_row_k_is_one_hot(tiny_config):
    model, k = GPT(tiny_config), 7
    cache = record(model, torch.randint(256, (3, 16)), "blocks.*.attn.hook_pattern",
                                 mask=self_only_mask(16, k), mask_layers=[0, 1])
    for layer in range(2):
        row = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, k]  # (B, H, T)
        assert_close(row, torch.nn.functional.one_hot(torch.tensor(k), 16).float().expand_as(row))


def test_find_super_neuron_finds_a_planted_one(tiny_config):
    model = GPT(tiny_config)
    with torch.no_grad():
        for weight in (model.blocks[1].mlp.w_gate.weight, model.blocks[1].mlp.w_up.weight):
            weight[13] *= 10
    neuron = interventions.find_super_neuron(model, torch.randint(256, (4, 16)))
    assert (neuron["layer"], neuron["unit"]) == (1, 13)
    assert neuron["gate_norm_z"] > 3 and neuron["up_norm_z"] > 3


# ----------------------------------------------------------------------------- claims (cpu profile)

OUT = os.path.join(ROOT, "out")  # the cpu model is trained once and cached in out/checkpoints


@pytest.fixture(scope="module")
def cpu_03():
    return dimension_disparity.main(["--profile", "cpu", "--seed", str(CLAIMS_SEED), "--out_dir", OUT])


@pytest.fixture(scope="module")
def cpu_04():
    return interventions.main(["--profile", "cpu", "--seed", str(CLAIMS_SEED), "--out_dir", OUT])


@pytest.mark.claims
@claim_not_held("cpu model measured: token 0's dominance ratio after RMSNorm is at most 2.58x the others' "
                "(layers 0-2: 0.96, 0.92, 2.58)")
def test_claim_token0_dominance_ratio_10x_the_others_in_some_layer(cpu_03):
    ratios = [a / b for a, b in zip(cpu_03["dominance_ratio_token0_by_layer"], cpu_03["dominance_ratio_others_by_layer"])]
    assert max(ratios) >= 10, f"token 0's dominance ratio is at most {max(ratios):.2f}x the others' (layers: {ratios})"


@pytest.mark.claims
@claim_not_held("cpu model measured: token 0's direction cosine is 0.89 in layer 2, the spike layer (the others': 0.26)")
def test_claim_token0_direction_fixed_after_the_spike(cpu_03):
    after = cpu_03["token0_direction_cosine_by_layer"][cpu_03["spike_layer"]:]
    assert min(after) >= 0.9, f"token 0's direction cosine from the spike layer {cpu_03['spike_layer']} on: {after}"


@pytest.mark.claims
@claim_not_held("cpu model measured: with k = 10 masked, k receives 0.039 from the later queries (1.6x its 0.024 "
                "baseline) and the argmax over positions >= 1 stays at 62")
def test_claim_mask_moves_the_sink_to_k(cpu_04):
    k, received = cpu_04["k"], cpu_04["attention_received_masked"]
    masked, baseline = received[k], cpu_04["attention_received_baseline"][k]
    sink = max(range(1, len(received)), key=received.__getitem__)
    assert cpu_04["sink_moved_to_k"], f"the masked model's sink over positions >= 1 is at {sink}; received at k={k}: {masked:.3f}"
    assert masked >= 3 * baseline, f"attention received at k={k}: {masked:.3f} masked vs {baseline:.3f} baseline"


@pytest.mark.claims
@claim_not_held("cpu model measured: attention to k rises from 0.024 at lambda = 1 to 0.049 at lambda = 32 (variance arm)")
def test_claim_variance_amplification_makes_a_sink(cpu_04):
    attention = cpu_04["attention_to_k_variance"]
    steps = [b - a for a, b in zip(attention, attention[1:])]
    assert min(steps) >= -1e-3, f"attention to k falls as lambda grows: {attention}"  # 1e-3: noise of 64 windows
    assert attention[-1] >= 0.3, f"attention to k at lambda = {cpu_04['lambdas'][-1]}: {attention[-1]:.3f}"


@pytest.mark.claims
@claim_not_held("cpu model measured: at lambda = 32 the norm control gives 0.027 and the variance arm 0.049: "
                "below it, but not below a third")
def test_claim_norm_control_makes_no_sink(cpu_04):
    variance, control = cpu_04["attention_to_k_variance"][-1], cpu_04["attention_to_k_norm_control"][-1]
    assert control < variance / 3, f"at the largest lambda: norm control {control:.3f} vs variance arm {variance:.3f}"

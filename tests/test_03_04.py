"""Tests of 03_dimension_disparity.py and 04_interventions.py: what their --quick metrics hold, and their
own functions on inputs with known answers (what every script writes: test_scripts.py; the shared measures:
test_measures.py; the paper's claims on the trained model: test_claims.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import load_script
from data import ByteData, load_corpus
from measures import attention_received, dominance_ratio, mean_pairwise_cosine
from model import GPT, InputError
from training import profile_configs, trained_model

dimension_disparity = load_script("03_dimension_disparity.py")
interventions = load_script("04_interventions.py")


# ----------------------------------------------------------------------------- the scripts' --quick metrics

def test_03_dominance_is_measured_after_the_blocks_rmsnorm(quick):
    """As the paper measures it (Llama-2's 263 is after RMSNorm): on attn_norm(resid_in), gain included."""
    out, results = quick
    model, _ = trained_model("tiny", out_dir=str(out))
    model_cfg, train_cfg = profile_configs("tiny")
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    x, _ = data.windows("val", 64, train_cfg.bos, torch.Generator().manual_seed(0))  # the script's windows, seed 0
    _, cache = model.eval().run_with_cache(x, record="blocks.*.hook_resid_in")
    with torch.no_grad():
        normalised = [block.attn_norm(cache[f"blocks.{i}.hook_resid_in"]) for i, block in enumerate(model.blocks)]
    expected = [float(dominance_ratio(n)[:, 0].mean()) for n in normalised]
    assert results["03_dimension_disparity"]["dominance_ratio_token0_by_layer"] == pytest.approx(expected, rel=1e-5)


def test_quick_03_shapes(quick):
    metrics = quick[1]["03_dimension_disparity"]
    n_layer, n_head = 2, 2  # the tiny profile
    assert len(metrics["dominance_ratio_token0_by_layer"]) == len(metrics["effective_rank_by_layer"]) == n_layer
    assert len(metrics["qk_alignment_by_head"]) == len(metrics["positive_score_ratio_by_head"]) == n_head


def test_quick_04_shapes_and_lambda_one_is_the_baseline(quick):
    metrics = quick[1]["04_interventions"]
    k = metrics["k"]
    assert k == 10 and len(metrics["attention_received_masked"]) == 32
    assert metrics["lambdas"] == [1, 2, 4, 8, 16, 32]
    for key in ("attention_to_k_variance", "attention_to_k_scale_control", "attention_to_k_shift_control"):
        assert len(metrics[key]) == 6
        assert metrics[key][0] == pytest.approx(metrics["attention_received_baseline"][k], abs=1e-6)
    main = metrics["amplification_main"]
    assert main["mu"] == "windows" and main["layers"] == list(range(metrics["token0_unit"]["layer"] + 1))
    readings = {(r["where"], r["mu"], r["arm"]) for r in metrics["amplification_readings"]}
    assert {(main["where"], mu, arm) for mu in ("windows", "positions") for arm in interventions.ARMS} <= readings


def test_quick_04_the_authors_reading_has_a_row_per_arm(quick):
    metrics = quick[1]["04_interventions"]
    k, observe = metrics["k"], metrics["amplification_authors"]["observe_layer"]
    assert observe == 1  # the tiny profile's 2 layers: only layer 1 has a layer below it
    rows = [r for r in metrics["amplification_readings"] if r["where"] == "below L_obs"]
    assert [r["arm"] for r in rows] == list(interventions.ARMS)
    for r in rows:
        assert {"where", "mu", "arm", "attention_to_k", "observe_layer"} <= set(r)
        assert r["mu"] == "values on random tokens" and r["observe_layer"] == observe and r["layers"] == [0]
        assert r["lambdas"] == metrics["amplification_authors"]["lambdas"] == [1, 2, 5, 10, 15, 20, 25, 30]
        assert len(r["attention_to_k"]) == 8
        # layer 1 is also the only layer the mask part measures: at lambda = 1, its attention to k unedited
        assert r["attention_to_k"][0] == pytest.approx(metrics["attention_received_baseline"][k], abs=1e-6)
    # about RANDOM_TOKENS random tokens, in whole windows of the tiny profile's 32
    assert metrics["amplification_authors"]["random_tokens"] == math.ceil(interventions.RANDOM_TOKENS / 32) * 32


@pytest.mark.parametrize("flags", [["--k", "32"], ["--k", "-1"], ["--k", "0"], ["--from_layer", "1"],
                                   ["--amplify_layers", "1-1"], ["--amplify_layers", "0-2"], ["--amplify_layers", "a"],
                                   ["--observe_layer", "0"], ["--observe_layer", "2"]])
def test_04_bad_k_or_layer_is_an_input_error(quick, flags):
    out, _ = quick  # its tiny model, trained once; nothing is written before the error
    with pytest.raises(InputError, match="--k|--from_layer|--amplify_layers|--observe_layer"):
        interventions.main(["--quick", "--out_dir", str(out)] + flags)


# ----------------------------------------------------------------------------- their own functions, known answers

def test_qk_locking_of_a_head_aligned_with_the_sink_key_and_of_one_orthogonal_to_it():
    """Head 0's W_Q has its principal direction along the sink key and every query scores it positively; head 1's
    is orthogonal to it and every query scores it negatively."""
    N, T, hd, C = 3, 5, 4, 8
    sink_key, other = torch.eye(hd)[0], torch.eye(hd)[1]
    w_query = torch.cat([torch.outer(sink_key, torch.randn(C)), torch.outer(other, torch.randn(C))])  # (2 hd, C)
    k = torch.randn(N, 2, T, hd)
    k[:, :, 0] = 2 * sink_key  # token 0's key, the same in every window and head
    q = torch.randn(N, 2, T, hd)
    q[:, 0, :, 0], q[:, 1, :, 0] = q[:, 0, :, 0].abs(), -q[:, 1, :, 0].abs()  # q . k_0 = 2 q[..., 0]
    alignment, positive = dimension_disparity.qk_locking_by_head(w_query, q, k)
    assert alignment == pytest.approx([1, 0], abs=1e-6) and positive == [1.0, 0.0]


def test_mean_pairwise_cosine():
    direction = torch.randn(8)
    same = (0.1 + torch.rand(5, 1)) * direction  # (5, 8): one direction, different lengths
    assert float(mean_pairwise_cosine(same)) == pytest.approx(1, abs=1e-5)
    opposite = torch.stack([direction, -direction])
    assert float(mean_pairwise_cosine(opposite)) == pytest.approx(-1, abs=1e-5)
    by_position = torch.randn(4, 3, 8)  # (N, T, C): one cosine per position
    assert mean_pairwise_cosine(by_position).shape == (3,)


# ----------------------------------------------------------------------------- interventions

@pytest.mark.parametrize("mu_over", ["windows", "positions", "a tensor (H, hd)"])
def test_amplification_and_its_two_controls(mu_over):
    head_out, k, lam = torch.randn(6, 2, 8, 4) + 0.5, 5, 8.0  # (B, H, T, hd), with a mean that is not 0
    given = torch.randn(2, 4)  # (H, hd): a mean given from outside, as the authors' mean value vector
    mu_over = given if mu_over == "a tensor (H, hd)" else mu_over
    for edit in interventions.ARMS.values():
        assert_close(edit(head_out, k, 1.0, mu_over), head_out, rtol=0, atol=1e-5)
    x_k = head_out[:, :, k]  # (B, H, hd)
    amplified = interventions.amplified(head_out, k, lam, mu_over)
    scaled = interventions.scale_control(head_out, k, lam, mu_over)
    shifted = interventions.shift_control(head_out, k, lam, mu_over)
    others = [t for t in range(8) if t != k]
    for edited in (amplified, scaled, shifted):
        assert torch.equal(edited[:, :, others], head_out[:, :, others])  # only token k changes
    mu = given if torch.is_tensor(mu_over) else x_k.mean(0, keepdim=True) if mu_over == "windows" else head_out.mean(dim=2)
    assert_close(amplified[:, :, k] - mu, lam * (x_k - mu))  # the deviation grows by lambda
    # scale: each window's norm matched, direction kept
    assert_close(scaled[:, :, k].norm(dim=-1), amplified[:, :, k].norm(dim=-1))
    cosine = F.cosine_similarity(scaled[:, :, k], x_k, dim=-1)
    assert_close(cosine, torch.ones_like(cosine))
    # shift: the mean squared norm over windows matched, the variance across windows unchanged
    assert_close(shifted[:, :, k].pow(2).sum(-1).mean(0), amplified[:, :, k].pow(2).sum(-1).mean(0))
    assert_close(shifted[:, :, k].var(dim=0), x_k.var(dim=0))
    if not isinstance(mu_over, str) or mu_over == "windows":  # mu the same in every window: the variance across
        assert_close(amplified[:, :, k].var(dim=0), lam ** 2 * x_k.var(dim=0))  # windows grows by lambda squared


def test_layer_range_of_amplify_layers():
    assert interventions.layer_range("0-1", 4) == [0, 1] and interventions.layer_range("2", 4) == [2]
    assert interventions.layer_range("0-3", 4) == [0, 1, 2, 3]
    for bad in ("3", "0-4", "2-1", "x", "-1"):
        with pytest.raises(InputError, match="--amplify_layers"):
            interventions.layer_range(bad, 4)


def test_lambda_one_edit_leaves_the_model_unchanged(tiny_config):
    model = GPT(tiny_config)
    x = torch.randint(256, (3, 16))
    unedited, _ = model.run_with_cache(x)
    for edit in interventions.ARMS.values():
        edits = {f"blocks.{i}.attn.hook_head_out": lambda h, e=edit: e(h, 5, 1.0) for i in range(2)}
        edited, _ = model.run_with_cache(x, edit=edits)
        assert_close(edited, unedited, rtol=0, atol=1e-5)


def test_find_super_neuron_finds_a_planted_one(tiny_config):
    model = GPT(tiny_config)
    with torch.no_grad():
        for weight in (model.blocks[1].mlp.w_gate.weight, model.blocks[1].mlp.w_up.weight):
            weight[13] *= 10
    neuron = interventions.find_super_neuron(model, torch.randint(256, (4, 16)))
    assert (neuron["layer"], neuron["unit"]) == (1, 13)
    assert neuron["gate_norm_z"] > 3 and neuron["up_norm_z"] > 3


def test_observe_layer_is_the_first_sink_layer_by_gu_et_als_rate_from_layer_1_on():
    first_token_attention = [0.9, 0.1, 0.2, 0.7]  # the fallback would choose layer 3
    rate = [1.0, 0.25, 0.5, 1.0]  # layer 0 is a sink layer, but nothing is below it
    assert interventions.observe_layer(rate, first_token_attention) == (2, "the first sink layer")
    no_sink = [1.0, 0.25, 0.4, 0.45]  # under SINK_LAYER_SHARE from layer 1 on: the most attention to token 0
    assert interventions.observe_layer(no_sink, first_token_attention)[0] == 3


def test_the_authors_edit_acts_below_the_observed_layer_only(tiny_config):
    model, k = GPT(tiny_config).eval(), 5
    with torch.no_grad():  # larger weights than at init: attention far from uniform, so that an edit shows
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.5)
    x, x_random = torch.randint(256, (4, 16)), torch.randint(256, (10, 16))
    means = interventions.value_means(model, x_random, [0], batch=3)  # windows 3 + 3 + 3 + 1
    _, values = model.run_with_cache(x_random, record="blocks.0.attn.hook_v")
    assert_close(means[0], values["blocks.0.attn.hook_v"].mean(dim=(0, 2)))  # over every token of every window
    _, patterns = model.run_with_cache(x, record="blocks.*.attn.hook_pattern")
    for observe in (0, 1):  # as main() reads it: the edit in every layer below L_obs, attention at L_obs alone
        unedited = float(attention_received(patterns[f"blocks.{observe}.attn.hook_pattern"])[k])
        for arm in interventions.ARMS.values():
            scores = [interventions.amplified_pass(model, x, k, arm, lam, list(range(observe)), [observe],
                                                   means)["attention_to_k"] for lam in (1, 30)]
            assert scores[0] == pytest.approx(unedited, abs=1e-6)  # lambda = 1: the model unedited
            if observe == 0:  # nothing below layer 0: every lambda reads the same
                assert scores[1] == scores[0]
            else:
                assert abs(scores[1] - scores[0]) > 0.01

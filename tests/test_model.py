"""Fast tests of model.py, data.py and training.py: the attention variants (the paper's four, the three
slot fixes), hook points, data, training, cache."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from conftest import ROOT
from data import BOS, ByteData, load_corpus, random_token_windows
from measures import variance_by_position
from model import apply_rope, ATTENTION_VARIANTS, GPT, GPTConfig, InputError, rope_tables, self_only_mask, SLOT_VARIANTS
from training import load_checkpoint, profile_configs, save_checkpoint, train, TrainConfig, trained_model


def variant(config, attn):
    return GPT(dataclasses.replace(config, attn=attn))


@pytest.mark.parametrize("attn", ATTENTION_VARIANTS)
def test_forward_backward_finite(tiny_config, attn):
    model = variant(tiny_config, attn)
    idx = torch.randint(256, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 257)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("attn", ATTENTION_VARIANTS)
def test_causal(tiny_config, attn):
    model = variant(tiny_config, attn)
    idx = torch.randint(256, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    assert_close(model(idx)[0][:, :9], model(changed)[0][:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(model(idx)[0][:, 9], model(changed)[0][:, 9])


@pytest.mark.parametrize("attn", [a for a in ATTENTION_VARIANTS if a != "sigmoid"])
def test_fast_path_equals_recorded_path(tiny_config, attn, monkeypatch):
    """The fast path (scaled_dot_product_attention) and the explicit one that records the pattern agree.
    Sigmoid has no fast path, so it is not a case here."""
    model = variant(tiny_config, attn)
    idx = torch.randint(256, (4, 16))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    fast, _ = model(idx)
    assert len(calls) == tiny_config.n_layer  # the fast path ran in every layer
    with model.hooks(record="*") as cache:
        recorded, _ = model(idx)
    assert len(calls) == tiny_config.n_layer  # and the recorded pass did not take it
    assert_close(fast, recorded, rtol=0, atol=1e-5)
    assert cache["blocks.1.attn.hook_pattern"].shape == (4, 2, 16, 16)


@pytest.mark.parametrize("attn", [a for a in ATTENTION_VARIANTS if a != "sigmoid"])
def test_fast_path_equals_recorded_path_under_bf16_autocast(tiny_config, attn):
    """As on a GPU: q and k stay in bf16 through RoPE, the recorded path computes its softmax in float32,
    so its rows (plus the slot's share, where there is a slot) sum to 1 as in float32, and the two paths agree within bf16's rounding (2^-8 relative)."""
    model = variant(tiny_config, attn)
    idx = torch.randint(256, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = model(idx)
        with model.hooks(record=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_slot"]) as cache:
            recorded, _ = model(idx)
    rows = cache["blocks.1.attn.hook_pattern"].sum(-1) + cache.get("blocks.1.attn.hook_slot", 0)  # (B, H, T)
    assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-6)
    assert_close(fast, recorded, rtol=2**-7, atol=2**-7 * fast.abs().max().item())


def test_unknown_variant_names_valid_ones():
    with pytest.raises(ValueError, match="softmax, sigmoid, headwise, gated"):
        GPTConfig(attn="linear")


def test_recorded_shapes_and_dtype(tiny_config):
    model = GPT(tiny_config)
    with model.hooks(record="*") as cache:
        model(torch.randint(256, (3, 10)))
    ffn = tiny_config.ffn_dim
    expected = {"blocks.0.attn.hook_pattern": (3, 2, 10, 10), "blocks.0.attn.hook_head_out": (3, 2, 10, 8),
                "blocks.0.attn.hook_head_out_post": (3, 2, 10, 8), "blocks.0.attn.hook_out": (3, 10, 16),
                "blocks.1.mlp.hook_gate": (3, 10, ffn), "blocks.1.mlp.hook_up": (3, 10, ffn),
                "blocks.1.mlp.hook_hidden": (3, 10, ffn), "blocks.0.hook_resid_in": (3, 10, 16),
                "hook_resid_final": (3, 10, 16)}
    for name, shape in expected.items():
        assert cache[name].shape == shape, name
        assert cache[name].dtype == torch.float32 and cache[name].device.type == "cpu"


def test_run_with_cache_records_reduces_and_stops_early(tiny_config):
    """One pass without gradients: the logits of forward, the recorded copies, a reduced value in place
    of its pattern, and with last_layer no logits and nothing recorded past that block."""
    model = GPT(tiny_config)
    idx = torch.randint(256, (3, 10))
    logits, cache = model.run_with_cache(idx, record="blocks.*.hook_resid_in",
                                         reduce={"blocks.*.attn.hook_pattern": lambda p: p.sum(-1).mean()})
    assert_close(logits, model(idx)[0], rtol=0, atol=1e-5)  # recording the pattern takes the explicit path
    assert not logits.requires_grad
    assert set(cache) == {"blocks.0.hook_resid_in", "blocks.1.hook_resid_in",
                          "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"}
    assert cache["blocks.1.attn.hook_pattern"] == pytest.approx(1.0)  # the reduced value: a row's sum, not (3, H, T, T)
    logits, early = model.run_with_cache(idx, record="blocks.*.hook_resid_in", last_layer=0)
    assert logits is None and set(early) == {"blocks.0.hook_resid_in"}
    assert_close(early["blocks.0.hook_resid_in"], cache["blocks.0.hook_resid_in"], rtol=0, atol=0)
    assert not any(point.active for point in model.hook_points.values())  # switched off after the pass


def test_unknown_hook_name_is_an_error(tiny_config):
    with pytest.raises(InputError, match="no hook point"):
        with GPT(tiny_config).hooks(record="blocks.0.attn.hook_nothing"):
            pass


def test_identity_edit_changes_nothing(tiny_config):
    model = GPT(tiny_config)
    idx = torch.randint(256, (2, 16))
    with model.hooks(edit={f"blocks.{i}.attn.hook_head_out": (lambda x: x) for i in range(2)}):
        edited, _ = model(idx)
    assert_close(edited, model(idx)[0], rtol=0, atol=1e-6)


def test_edit_reaches_the_output(tiny_config):
    model = GPT(tiny_config)
    idx = torch.randint(256, (2, 16))
    with model.hooks(edit={"blocks.0.attn.hook_head_out": lambda x: 10 * x}):
        edited, _ = model(idx)
    assert not torch.allclose(edited, model(idx)[0])


def test_self_only_mask_makes_row_k_one_hot(tiny_config):
    model = GPT(tiny_config)
    k = 5
    with model.hooks(record="*hook_pattern", mask=self_only_mask(16, k)) as cache:
        model(torch.randint(256, (2, 16)))
    for layer in range(2):
        row = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, k]  # (B, H, T)
        assert_close(row, torch.nn.functional.one_hot(torch.tensor(k), 16).float().expand_as(row))
    # the mask is gone after the `with` block
    assert model.blocks[0].attn.custom_mask is None


def test_mask_in_chosen_layers_only(tiny_config):
    model = GPT(tiny_config)
    with model.hooks(record="*hook_pattern", mask=self_only_mask(16, 5), mask_layers=[1]) as cache:
        model(torch.randint(256, (2, 16)))
    assert cache["blocks.0.attn.hook_pattern"][:, :, 5, :5].sum() > 0
    assert cache["blocks.1.attn.hook_pattern"][:, :, 5, :5].sum() == 0


@pytest.mark.parametrize("n_kv_head", [0, 1])  # 0: one key/value head per query head; 1: grouped-query attention
def test_headwise_gain_is_token0s_output_scale_on_a_random_input(tiny_config, n_kv_head):
    """The authors' calibration, checked through the attention's own forward pass: with the same seed,
    a model of gain ones has the same weights, and the calibration draws one standard-normal x_0 per
    block after them. Head h's gain is the std over head_dim of head h's output at token 0 for x_0."""
    config = dataclasses.replace(tiny_config, attn="headwise", n_kv_head=n_kv_head)
    torch.manual_seed(3)
    calibrated = GPT(config)
    torch.manual_seed(3)
    ones = GPT(dataclasses.replace(config, head_norm_init="ones"))
    T, C = 5, config.n_embd
    draws = [torch.randn(C) for _ in ones.blocks]  # the calibration's x_0 of each block, in its order
    for i, (block, x0) in enumerate(zip(ones.blocks, draws)):
        x = torch.cat([x0.view(1, 1, C), torch.randn(1, T - 1, C)], dim=1)  # later tokens cannot change token 0's output
        with torch.no_grad(), ones.hooks(record=f"blocks.{i}.attn.hook_head_out") as cache:
            block.attn(x, ones.rope_cos[:T], ones.rope_sin[:T])
        token0 = cache[f"blocks.{i}.attn.hook_head_out"][0, :, 0]  # (H, hd)
        expected = token0.std(dim=-1, correction=0)  # (H,)
        gain = calibrated.blocks[i].attn.head_norm_gain  # (H, 1, hd)
        assert_close(gain.detach(), expected.view(-1, 1, 1).expand_as(gain), rtol=1e-5, atol=0)
        assert (ones.blocks[i].attn.head_norm_gain == 1).all()
    assert gain.max() < 0.5  # far below the ones it replaces (init std 0.02: about 0.02 * sqrt(C))


def test_headwise_norm_gives_rms_one_before_the_gain(tiny_config):
    model = variant(tiny_config, "headwise")
    with torch.no_grad():
        model.blocks[0].attn.head_norm_gain.fill_(1.0)
    with model.hooks(record="blocks.0.attn.hook_head_out*") as cache:
        model(torch.randint(256, (2, 16)))
    rms = cache["blocks.0.attn.hook_head_out_post"].pow(2).mean(-1).sqrt()  # (B, H, T)
    raw_mean_square = cache["blocks.0.attn.hook_head_out"].pow(2).mean(-1)
    eps = torch.finfo(torch.float32).eps  # rms_normalize's: o / sqrt(mean(o^2) + eps) has RMS sqrt(ms / (ms + eps))
    assert_close(rms, (raw_mean_square / (raw_mean_square + eps)).sqrt(), rtol=0, atol=1e-5)
    raw_rms = raw_mean_square.sqrt()
    assert (raw_rms - 1).abs().max() > 0.5  # the normalisation did something


def test_sigmoid_weights_in_unit_interval_and_unnormalised(tiny_config):
    model = variant(tiny_config, "sigmoid")
    with model.hooks(record="*hook_pattern") as cache:
        model(torch.randint(256, (2, 16)))
    weights = cache["blocks.0.attn.hook_pattern"]
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    assert (weights[..., causal] > 0).all() and (weights[..., causal] < 1).all()
    assert (weights[..., ~causal] == 0).all()
    row_sums = weights.sum(-1)
    assert (row_sums - 1).abs().max() > 0.1  # rows do not sum to one
    # b = -log(T): at init (scores near 0) each weight is about 1/T
    assert_close(weights[..., causal].mean(), torch.tensor(1 / 16), rtol=0.1, atol=0)


def test_gated_output_is_head_output_times_gate(tiny_config):
    model = variant(tiny_config, "gated")
    idx = torch.randint(256, (2, 16))
    with model.hooks(record=["blocks.0.attn.hook_head_out*", "blocks.0.hook_resid_in"]) as cache:
        model(idx)
    block = model.blocks[0]
    x = block.attn_norm(cache["blocks.0.hook_resid_in"])
    gate = torch.sigmoid(block.attn.gate(x)).view(2, 16, 2, 8).transpose(1, 2)  # (B, H, T, hd)
    assert_close(cache["blocks.0.attn.hook_head_out_post"], cache["blocks.0.attn.hook_head_out"] * gate)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):  # q at position m, k at position n
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m], sin[m])
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n], sin[n])
        return (qm * kn).sum()
    assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)
    assert_close(score(3, 3), (q * k).sum(), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(score(5, 2), score(5, 4))


def test_residual_projections_have_scaled_init():
    model = GPT(GPTConfig(n_layer=8, n_embd=128, n_head=4))
    assert abs(model.blocks[3].attn.wo.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert abs(model.blocks[3].mlp.w_down.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert abs(model.blocks[3].mlp.w_up.weight.std().item() - 0.02) < 1e-3


def test_init_variance_decays_like_one_over_t_plus_one():
    """Paper §3: at init attention is near uniform, so the head output at t averages t+1
    values and its variance across sequences is var(v) / (t + 1)."""
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=4, n_embd=64))
    idx = random_token_windows(2048, 32, bos=False, generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(idx, record="blocks.0.attn.hook_head_out")
    across_sequences, _ = variance_by_position(cache["blocks.0.attn.hook_head_out"])  # (T,)
    for t in (1, 3, 7, 15, 31):
        assert_close(across_sequences[t] / across_sequences[0], torch.tensor(1 / (t + 1)), rtol=0.15, atol=0)


def test_checkpoint_round_trip(tiny_config, tmp_path):
    model = GPT(tiny_config)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, TrainConfig(), {"val_loss": [1.0]}, "data:1")
    loaded, history = load_checkpoint(path, expect={"data": "data:1"})
    idx = torch.randint(256, (2, 16))
    assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert history == {"val_loss": [1.0]}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    with pytest.raises(InputError, match="does not match"):
        load_checkpoint(path, expect={"data": "data:2"})


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="broken.pt is unreadable"):
        load_checkpoint(str(path))


def test_data_windows_from_a_small_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("hello sinks. " * 200)
    data = ByteData(load_corpus(str(path)), 16, "text.txt")
    generator = torch.Generator().manual_seed(0)
    x, y = data.windows("train", 4, bos=False, generator=generator)
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    x, y = data.windows("val", 4, bos=True, generator=generator)
    assert (x[:, 0] == BOS).all() and (x[:, 1:] == y[:, :-1]).all() and (y < 256).all()


def test_windows_are_the_text_slices_at_the_drawn_starts():
    """One gather draws the same windows as slicing the text at each start, from the same generator."""
    data = ByteData(bytes(range(256)) * 40, 16)
    x, y = data.windows("train", 8, bos=False, generator=torch.Generator().manual_seed(4))
    starts = torch.randint(len(data.train) - 16, (8,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = torch.stack([data.train[s:s + 17] for s in starts]).long()  # (8, T + 1)
    assert (x == expected[:, :-1]).all() and (y == expected[:, 1:]).all()


def test_missing_empty_and_short_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_corpus(str(tmp_path / "nothing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(InputError, match="too short"):
        ByteData(load_corpus(str(tmp_path / "short.txt")), 16)


def test_window_longer_than_the_model_is_an_error(tiny_config):
    with pytest.raises(InputError, match="longer than the model's window"):
        GPT(tiny_config)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("attn", ATTENTION_VARIANTS)
def test_tiny_training_lowers_the_loss(tmp_path, attn):
    path = tmp_path / "text.txt"
    path.write_text("the first token attends only to itself. " * 300)
    data = ByteData(load_corpus(str(path)), 16)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, attn=attn))
    cfg = TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=5, eval_interval=20, eval_windows=8)
    history = train(model, data, cfg)
    assert history["val_loss"][-1] < history["val_loss"][0] - 1.0


def test_bad_device_is_a_one_line_error_and_exit_2():
    code = "import cli, torch; cli.run_script(lambda: cli.pick_device('cuda' if not torch.cuda.is_available() else 'tpu'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")


def test_non_finite_loss_stops_training(tmp_path, tiny_config):
    path = tmp_path / "text.txt"
    path.write_text("attention sinks " * 200)
    model = GPT(tiny_config)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(model, ByteData(load_corpus(str(path)), 16), TrainConfig(steps=5, eval_interval=10, eval_windows=4))


@pytest.mark.parametrize("head_norm_gain_decay", [True, False])
def test_only_head_norm_gain_decay_decays_a_norm_gain(tmp_path, tiny_config, monkeypatch, head_norm_gain_decay):
    """RMSNorm's gains never decay; head-wise RMSNorm's (H, 1, hd) gain decays only with head_norm_gain_decay
    (the authors' optimizer decays every parameter of 2 or more dimensions)."""
    groups, adamw = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: groups.extend(params) or adamw(params, **kw))
    model = variant(tiny_config, "headwise")
    path = tmp_path / "text.txt"
    path.write_text("norm gains " * 200)
    train(model, ByteData(load_corpus(str(path)), 16),
          TrainConfig(steps=1, weight_decay=0.1, eval_windows=4, head_norm_gain_decay=head_norm_gain_decay))
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = name.endswith("norm.weight") or (name.endswith("head_norm_gain") and not head_norm_gain_decay)
        assert decay_of[id(p)] == (0.0 if no_decay else 0.1), name


def test_edit_accepts_glob_patterns_like_record(tiny_config):
    model = GPT(tiny_config)
    idx = torch.randint(256, (2, 16))
    with model.hooks(edit={"blocks.*.attn.hook_out": torch.zeros_like}, record="blocks.*.attn.hook_out") as cache:
        edited, _ = model(idx)
    assert all(cache[f"blocks.{i}.attn.hook_out"].abs().max() == 0 for i in range(2))
    assert not torch.allclose(edited, model(idx)[0])


def test_two_writers_of_one_checkpoint_both_end_with_a_whole_file(tiny_config, tmp_path, monkeypatch):
    """A second run saves the same model while the first is between writing and renaming."""
    model, path, real_save, interleaved = GPT(tiny_config), str(tmp_path / "ckpt.pt"), torch.save, []

    def save_then_let_the_other_writer_finish(obj, f):
        real_save(obj, f)
        if not interleaved:
            interleaved.append(True)
            save_checkpoint(path, model, TrainConfig(), {"val_loss": [2.0]}, "data:1")

    monkeypatch.setattr(torch, "save", save_then_let_the_other_writer_finish)
    save_checkpoint(path, model, TrainConfig(), {"val_loss": [1.0]}, "data:1")
    _, history = load_checkpoint(path)
    assert history in ({"val_loss": [1.0]}, {"val_loss": [2.0]})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_cache_key_holds_the_torch_version(tmp_path, monkeypatch):
    trained_model("tiny", out_dir=str(tmp_path))
    trained_model("tiny", out_dir=str(tmp_path))  # the same environment: loaded from the cache
    assert len(os.listdir(tmp_path / "checkpoints")) == 1
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    trained_model("tiny", out_dir=str(tmp_path))  # another torch: trained anew, not loaded
    assert len(os.listdir(tmp_path / "checkpoints")) == 2


def test_a_folder_as_data_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        load_corpus(str(tmp_path))


def run_script_in_a_subprocess(body):
    code = f"import cli, sys\ndef main():\n    {body}\ncli.run_script(main)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_quick_with_another_profile_is_an_error():
    result = run_script_in_a_subprocess("cli.setup(cli.script_parser('x').parse_args(['--quick', '--profile', 'cpu']), 'x.py')")
    assert result.returncode == 2 and result.stderr.startswith("error: --quick") and result.stderr.count("\n") == 1


def test_unwritable_out_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    args = f"['--quick', '--out_dir', {str(tmp_path / 'a_file' / 'out')!r}]"
    result = run_script_in_a_subprocess(f"cli.setup(cli.script_parser('x').parse_args({args}), 'x.py')")
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write") and result.stderr.count("\n") == 1


def test_ctrl_c_is_one_line_and_exit_130():
    result = run_script_in_a_subprocess("raise KeyboardInterrupt")
    assert result.returncode == 130
    assert result.stderr.strip().count("\n") == 0 and "not saved" in result.stderr


def test_gpu_profile_trains_two_steps_on_the_cpu(tmp_path):
    """The gpu profile's model and recipe at a short T: no shape or dtype error reaches a GPU user.
    The second half runs a forward and backward under bf16 autocast on the CPU, the dtype mix that CUDA
    training uses; CUDA's own autocast is not run here (no GPU)."""
    model_cfg, train_cfg = profile_configs("gpu")
    model_cfg = dataclasses.replace(model_cfg, block_size=32)
    train_cfg = dataclasses.replace(train_cfg, steps=2, batch_size=2, eval_windows=2, warmup_steps=1)
    path = tmp_path / "text.txt"
    path.write_text("def sink(token):\n    return token\n" * 100)
    data = ByteData(load_corpus(str(path)), 32)
    model = GPT(model_cfg)
    history = train(model, data, train_cfg)
    assert len(history["train_loss"]) == 2 and all(math.isfinite(v) for v in history["train_loss"] + history["val_loss"])
    x, y = data.windows("train", 2, train_cfg.bos, torch.Generator().manual_seed(0), train_cfg.repeat_prob, train_cfg.random_prob)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    assert math.isfinite(loss.item())


# ----------------------------------------------------------------------------- the slot fixes
def same_weights(config, attn, donor):
    """A model of variant `attn` with `donor`'s weights (its slot's, where both have one)."""
    model = variant(config, attn)
    missing, _ = model.load_state_dict(donor.state_dict(), strict=False)
    assert all(name.split(".")[-1].startswith("slot_") for name in missing)
    return model


def randomise_slots(model, scale=1.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("slot_"):
                p.copy_(scale * torch.randn_like(p))
    return model


def both_paths(model, idx):
    """(fast logits, recorded logits, recorded cache) for one batch."""
    fast, _ = model(idx)
    with model.hooks(record=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_slot"]) as cache:
        recorded, _ = model(idx)
    return fast, recorded, cache


def test_softmax1_is_sink_logit_with_the_logit_held_at_0(tiny_config):
    """Miller's softmax off by one is gpt-oss's sink logit at b = 0, on both paths; neither is softmax."""
    idx = torch.randint(256, (3, 16))
    sink = variant(tiny_config, "sink_logit")
    assert all((b.slot_logit == 0).all() for b in (blk.attn for blk in sink.blocks))  # initialised at 0
    off_by_one = same_weights(tiny_config, "softmax1", sink)
    for a, b in zip(both_paths(sink, idx)[:2], both_paths(off_by_one, idx)[:2]):
        assert_close(a, b, rtol=0, atol=1e-6)
    plain, _ = same_weights(tiny_config, "softmax", sink)(idx)
    assert (plain - off_by_one(idx)[0]).abs().max() > 1e-3  # the slot changes the output


def test_sink_logit_at_minus_30_is_softmax(tiny_config):
    """exp(-30) ~ 1e-13: a slot with that logit takes no weight, and the head is softmax's again."""
    idx = torch.randint(256, (3, 16))
    sink = variant(tiny_config, "sink_logit")
    with torch.no_grad():
        for blk in sink.blocks:
            blk.attn.slot_logit.fill_(-30.0)
    plain = same_weights(tiny_config, "softmax", sink)
    for a, b in zip(both_paths(sink, idx)[:2], both_paths(plain, idx)[:2]):
        assert_close(a, b, rtol=0, atol=1e-5)


def test_kv_bias_at_zero_is_softmax1(tiny_config):
    """k' = 0 gives the slot the logit 0 and v' = 0 adds nothing: Miller's softmax1. With k', v' drawn, it is not."""
    idx = torch.randint(256, (3, 16))
    kv = variant(tiny_config, "kv_bias")
    off_by_one = same_weights(tiny_config, "softmax1", kv)
    for a, b in zip(both_paths(kv, idx)[:2], both_paths(off_by_one, idx)[:2]):
        assert_close(a, b, rtol=0, atol=1e-6)
    assert (randomise_slots(kv)(idx)[0] - off_by_one(idx)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", SLOT_VARIANTS)
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_each_fused_slot_equals_the_explicit_one_and_its_parameters_learn(tiny_config, attn, n_kv_head):
    """The fused path (the slot as an extra key of scaled_dot_product_attention, its logit in the mask) gives
    the explicit path's logits and gradients, also under grouped-query attention; the slot's parameters get
    gradients on both (sink_logit: b; kv_bias: k' and v'; softmax1 has none)."""
    config = dataclasses.replace(tiny_config, n_kv_head=n_kv_head)
    model = randomise_slots(variant(config, attn))
    idx = torch.randint(256, (3, 16))
    fast, recorded, _ = both_paths(model, idx)
    assert_close(fast, recorded, rtol=0, atol=1e-5)
    grads = []
    for record in ([], ["blocks.*.attn.hook_slot"]):  # fused, then explicit
        model.zero_grad()
        with model.hooks(record=record):
            model(idx, idx)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    slots = [n for n in grads[0] if n.split(".")[-1].startswith("slot_")]
    assert len(slots) == {"sink_logit": 1, "softmax1": 0, "kv_bias": 2}[attn] * config.n_layer
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    assert all(grads[0][n].abs().max() > 0 for n in slots)


@pytest.mark.parametrize("attn", SLOT_VARIANTS)
def test_real_keys_and_the_slot_share_each_querys_weight(tiny_config, attn):
    """On a fresh model, and with the slot drawn at random: sum_s A[t, s] + share_t = 1 for every query,
    and the slot's share is strictly between 0 and 1 (query 0 has one real key and the slot)."""
    idx = torch.randint(256, (3, 16))
    for model in (variant(tiny_config, attn), randomise_slots(variant(tiny_config, attn))):
        _, _, cache = both_paths(model, idx)
        for i in range(tiny_config.n_layer):
            share = cache[f"blocks.{i}.attn.hook_slot"]  # (B, H, T)
            rows = cache[f"blocks.{i}.attn.hook_pattern"].sum(-1) + share
            assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-6)
            assert ((share > 0) & (share < 1)).all()


def test_a_compiled_slot_model_gives_the_eager_logits(tiny_config):
    """torch.compile traces the fused slot (kv_bias has all three pieces: k', v' and the mask)."""
    model = randomise_slots(variant(tiny_config, "kv_bias"))
    idx = torch.randint(256, (3, 16))
    eager, _ = model(idx)
    compiled, _ = torch.compile(model)(idx)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

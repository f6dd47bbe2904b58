"""Tests of how training.py runs a step on what a device has: micro-batches with gradient accumulation,
the probe for the largest micro-batch that fits (its out-of-memory errors faked here), the precision a
device gets (its compute capability faked; fp16 and bf16 autocast run on the CPU), the loss read every
CHECK_EVERY steps, --micro_batch on the scripts, and 01-04 under torchrun (2 gloo processes)."""
import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch
from torch.testing import assert_close

import cli
import training
from conftest import ROOT, load_script, numbers_in
from data import ByteData
from model import ATTENTION_VARIANTS, GPT, InputError
from training import (TrainConfig, accumulate_gradients, checkpoint_path, compiles, device_precision, largest_micro_batch,
                      profile_configs, train, training_environment)

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)).encode()


@pytest.fixture
def data():
    return ByteData(TEXT, 16)


def a_batch(n=8, T=16):
    x = torch.randint(256, (n, T), generator=torch.Generator().manual_seed(5))
    return x, torch.roll(x, -1, dims=1)


def torchrun(folder, *command, timeout=120):
    """python -m torch.distributed.run with 2 processes on this machine -> (CompletedProcess, seconds)."""
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command],
                          cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.time() - start


# ----------------------------------------------------------------------------- micro-batches

@pytest.mark.parametrize("attn", ATTENTION_VARIANTS)
@pytest.mark.parametrize("micro_batch", [2, 3])  # 4 micro-batches of 2; 3, 3 and 2: unequal shares
def test_micro_batches_give_the_whole_batch_gradient(tiny_config, attn, micro_batch):
    whole = GPT(dataclasses.replace(tiny_config, attn=attn))
    parts = copy.deepcopy(whole)
    x, y = a_batch()
    loss = accumulate_gradients(whole, x, y, len(x))
    assert_close(accumulate_gradients(parts, x, y, micro_batch), loss, atol=1e-6, rtol=0)
    for (name, p), q in zip(whole.named_parameters(), parts.parameters()):
        assert_close(q.grad, p.grad, atol=1e-5, rtol=0, msg=name)


def test_one_micro_batch_is_the_plain_step_to_the_bit(tiny_config):
    """What a single-process fp32 training does, unchanged by gradient accumulation."""
    model = GPT(tiny_config)
    plain = copy.deepcopy(model)
    x, y = a_batch()
    loss = accumulate_gradients(model, x, y, len(x))
    _, plain_loss = plain(x, y)
    plain_loss.backward()
    assert torch.equal(loss, plain_loss.detach())
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))


# ----------------------------------------------------------------------------- the probe

def step_that_fits_up_to(limit, tried):
    """A stand-in for one micro-batch's forward and backward on a GPU with room for `limit` windows."""
    def try_step(size):
        tried.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory trying {size} windows")
    return try_step


@pytest.mark.parametrize("limit, expected", [(32, 32), (20, 16), (5, 4), (1, 1)])
def test_probe_picks_the_largest_micro_batch_that_fits(limit, expected):
    tried, freed = [], []
    assert largest_micro_batch(step_that_fits_up_to(limit, tried), 32, lambda: freed.append(len(tried))) == expected
    assert tried == [32, 16, 8, 4, 2, 1][:len(tried)] and tried[-1] == expected
    assert freed == list(range(1, len(tried)))  # once after each size that did not fit, before the next try


def test_probe_gives_none_when_not_one_window_fits_and_lets_other_errors_through():
    tried, freed = [], []
    assert largest_micro_batch(step_that_fits_up_to(0, tried), 32, lambda: freed.append(1)) is None
    assert tried == [32, 16, 8, 4, 2, 1] and len(freed) == 6

    def broken_step(size):
        raise RuntimeError("a bug, not a full GPU")
    with pytest.raises(RuntimeError, match="a bug"):
        largest_micro_batch(broken_step, 32, lambda: None)


def test_no_window_fitting_on_the_gpu_is_a_one_line_error(tiny_config, monkeypatch):
    """plan_training's CUDA branch (training.cuda_micro_batch), on a faked 15 GiB T4."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=15 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    model = GPT(tiny_config)
    assert training.cuda_micro_batch(step_that_fits_up_to(3, []), 16, model, 16) == 2
    with pytest.raises(InputError) as error:
        training.cuda_micro_batch(step_that_fits_up_to(0, []), 16, model, 16)
    message = str(error.value)
    assert "\n" not in message and message.startswith("one window of 16 tokens does not fit on Tesla T4 (15.0 GiB)")
    state = 16 * sum(p.numel() for p in model.parameters()) / 2**30  # fp32 weights, gradients, AdamW's two moments
    assert f"take {state:.2f} GiB" in message and message.endswith("try a smaller --profile")
    assert len(emptied) == 3 + 5  # after each size that did not fit: 16, 8 and 4, then 16, 8, 4, 2 and 1


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("capability, precision", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")])
def test_precision_follows_the_compute_capability(monkeypatch, capability, precision):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert device_precision("cuda") == precision
    assert device_precision("cpu") == device_precision("mps") == "fp32"


def test_an_fp16_step_with_a_grad_scaler_runs_on_the_cpu(tiny_config):
    model = GPT(tiny_config)
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    x, y = a_batch()
    loss = accumulate_gradients(model, x, y, 4, "fp16", scaler)
    _, fp32_loss = before(x, y)
    assert math.isfinite(loss.item()) and 0 < abs(loss.item() - fp32_loss.item()) < 1e-2  # autocast ran, in fp16
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**16  # no inf in the scaled gradients: the step was taken, not skipped
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters())]
    assert all(changed)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_train_scales_the_loss_in_fp16_only(tiny_config, data, monkeypatch, precision):
    """train on a device given fp16 (a T4), bf16 (an A100) or fp32, its autocast run on the CPU."""
    scalers, grad_scaler = [], torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scalers.append(grad_scaler(*a, **k)) or scalers[-1])
    monkeypatch.setattr(training, "device_precision", lambda device: precision)
    history = train(GPT(tiny_config), data, TrainConfig(steps=3, batch_size=4, eval_interval=10, eval_windows=4))
    assert [s.is_enabled() for s in scalers] == [precision == "fp16"]
    assert len(history["train_loss"]) == 3 and all(map(math.isfinite, history["train_loss"] + history["val_loss"]))


# ----------------------------------------------------------------------------- the loss, read every CHECK_EVERY steps

@pytest.mark.parametrize("check_every, last_step", [(5, 9), (50, 11)])
def test_a_nan_mid_chunk_is_reported_at_its_own_step(tiny_config, data, monkeypatch, check_every, last_step):
    """The weights turn NaN after step 6's backward, so step 7's loss is the first NaN; it is read at the
    end of its chunk (step 9 with reads every 5 steps, the last step 11 with every 50) and named by its step."""
    monkeypatch.setattr(training, "CHECK_EVERY", check_every)
    steps = []

    def poison_after_step_6(step, model):
        steps.append(step)
        if step == 6:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 7;"):
        train(GPT(tiny_config), data, TrainConfig(steps=12, batch_size=4, eval_interval=100, eval_windows=4),
              after_backward=poison_after_step_6)
    assert steps[-1] == last_step


# ----------------------------------------------------------------------------- the scripts

def test_micro_batch_gives_the_same_held_out_numbers(tmp_path, capsys):
    """01 --quick trains its tiny model (batch 16) in 4 micro-batches of 4: the same model within float tolerance."""
    variance = load_script("01_variance.py")
    whole = variance.main(["--quick", "--out_dir", str(tmp_path / "whole")])
    assert "micro-batch 16 x 1 accumulation" in capsys.readouterr().out
    parts = variance.main(["--quick", "--micro_batch", "4", "--out_dir", str(tmp_path / "parts")])
    assert "micro-batch 4 x 4 accumulation" in capsys.readouterr().out
    for key in ("held_out_loss", "var_by_position_trained", "var_by_position_random_tokens", "var_ratio_token0",
                "first_token_attention_by_layer", "first_token_norm_by_layer", "post_wo_var_ratio_by_layer"):
        assert numbers_in(parts[key]) == pytest.approx(numbers_in(whole[key]), rel=1e-4, abs=1e-7), key


def test_scripts_other_than_05_refuse_torchrun_before_loading_anything(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(cli, "load_corpus", lambda *a: loaded.append(a) or TEXT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for script in ("01_variance.py", "02_super_neurons.py", "03_dimension_disparity.py", "04_interventions.py"):
        args = cli.script_parser("x").parse_args(["--quick", "--out_dir", str(tmp_path / "out")])
        with pytest.raises(InputError, match=f"{script} runs in one process.*only 05_pretrain_headwise.py trains"):
            cli.setup(args, os.path.join(ROOT, script))
    assert not loaded and not (tmp_path / "out").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: an ordinary run
    cli.setup(cli.script_parser("x").parse_args(["--quick", "--out_dir", str(tmp_path / "out")]), "01_variance.py")
    assert loaded


def test_01_under_torchrun_stops_with_one_error_line_and_exit_2(tmp_path):
    done, _ = torchrun(tmp_path, os.path.join(ROOT, "01_variance.py"), "--quick", "--out_dir", str(tmp_path / "out"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and errors, done.stderr[-3000:]
    assert set(errors) == {errors[0]} and "only 05_pretrain_headwise.py trains under torchrun" in errors[0]
    assert len(errors) <= 2  # one a process; torchrun may end the second before it prints
    assert "exitcode  : 2" in done.stderr  # torchrun's report of the process that failed first
    assert not (tmp_path / "out").exists()  # it stopped before any data or model


# Rank 1 fails in its second step; rank 0 then sleeps where it would wait for rank 1 at a collective
# (NCCL waits for a dead peer until its timeout): only torchrun, which stops every process when one
# exits with an error, can end it.
FAILING_DRIVER = textwrap.dedent(f"""
    import sys, time
    sys.path.insert(0, {ROOT!r})
    import cli, training
    from data import ByteData
    from model import GPT, GPTConfig

    def main():
        device, rank, _ = training.init_distributed("cpu")

        def fail_on_rank_1(step, model):
            if step == 1 and rank == 1:
                raise FloatingPointError("rank 1 fails")
            if step == 1:
                time.sleep(300)
        data = ByteData(open("corpus.txt", "rb").read(), 16)
        training.train(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)), data,
                       training.TrainConfig(steps=4, batch_size=4, eval_windows=4), after_backward=fail_on_rank_1)
        print("rank", rank, "finished")
    cli.run_script(main)
""")


def test_an_error_on_one_rank_ends_the_others_in_seconds(tmp_path):
    (tmp_path / "driver.py").write_text(FAILING_DRIVER)
    (tmp_path / "corpus.txt").write_bytes(TEXT)
    done, seconds = torchrun(tmp_path, "driver.py", timeout=240)
    assert done.returncode != 0 and "finished" not in done.stdout
    assert "error: rank 1 fails" in done.stderr and "exitcode  : 2" in done.stderr, done.stderr[-3000:]
    assert seconds < 60  # not rank 0's 300 s sleep, nor a collective's timeout


# ----------------------------------------------------------------------------- torch.compile

def test_a_compiled_training_gives_the_eager_losses(tiny_config, data):
    """train(compile=True), as on CUDA by default, on the CPU: the same losses as eager within float32's
    rounding (the compiled kernels sum in another order), and evaluation still runs the module itself.
    Sigmoid: its explicit path (mask, bias, sigmoid) is the one that compiling fuses; one variant keeps
    the fast suite's time (a first compilation takes tens of seconds on 2 cores)."""
    attn = "sigmoid"
    cfg = TrainConfig(steps=4, batch_size=8, eval_interval=4, eval_windows=4)
    histories = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(tiny_config, attn=attn))
        histories.append(train(model, data, cfg, compile=compile))
    eager, compiled = histories
    assert_close(compiled["train_loss"], eager["train_loss"], rtol=1e-5, atol=0)
    assert_close(compiled["val_loss"], eager["val_loss"], rtol=1e-5, atol=0)


def test_compiled_where_it_pays():
    """On CUDA always; on the CPU from CPU_COMPILE_FROM_TOKENS training tokens (the cpu and cpu_bos profiles,
    not tiny nor 05's 2000-step seed study); never on MPS; --no_compile or compile=True win."""
    def tokens(profile, steps=None):
        model_cfg, train_cfg = profile_configs(profile, steps=steps)
        return train_cfg, model_cfg.block_size
    assert compiles("cpu", *tokens("cpu")) and compiles("cpu", *tokens("cpu_bos"))
    assert not compiles("cpu", *tokens("tiny")) and not compiles("cpu", *tokens("cpu", steps=2000))
    assert compiles("cuda", *tokens("tiny")) and not compiles("mps", *tokens("cpu"))
    assert not compiles("cpu", *tokens("cpu"), compile=False) and compiles("cpu", *tokens("tiny"), compile=True)


def test_a_compiled_model_is_keyed_apart_with_its_threads(data):
    """A compiled step rounds differently, so it is another model: its own cache key, with the thread count on the
    CPU (each count splits its sums its own way); an eager model keeps the key it had before compiling existed."""
    assert training_environment("cpu") == {"torch": str(torch.__version__), "device": "cpu", "precision": "fp32"}
    assert training_environment("cpu", compiled=True) == {**training_environment("cpu"), "compiled": True,
                                                           "threads": torch.get_num_threads()}
    assert checkpoint_path("cpu", "softmax", 0, data, "cpu", "out")[0] != \
        checkpoint_path("cpu", "softmax", 0, data, "cpu", "out", compile=False)[0]
    assert checkpoint_path("tiny", "softmax", 0, data, "cpu", "out")[0] == \
        checkpoint_path("tiny", "softmax", 0, data, "cpu", "out", compile=False)[0]


def test_a_compiled_cpu_training_repeats_to_the_bit(tiny_config, data):
    """Twice the same compiled training: the same losses and weights, to the bit (train switches on
    torch's deterministic algorithms for a compiled CPU step, and back off after)."""
    cfg = TrainConfig(steps=4, batch_size=8, eval_interval=4, eval_windows=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(tiny_config)
        runs.append((train(model, data, cfg, compile=True), model.state_dict()))
    assert runs[0][0]["train_loss"] == runs[1][0]["train_loss"]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- snapshots along training

def test_snapshot_steps_are_step_0_and_log_spaced_to_the_last():
    assert training.snapshot_steps(60) == [0, 1, 2, 4, 8, 15, 30, 60]
    assert training.snapshot_steps(12000) == [0, 12, 38, 120, 379, 1200, 3795, 12000]
    assert training.snapshot_steps(100, 0) == [] and training.snapshot_steps(100, 2) == [0, 100]


def test_a_snapshot_is_the_model_a_run_of_that_many_steps_trains(tmp_path):
    """The tiny profile with its 8 snapshots; then separate tiny runs of 15 and 30 steps, same seed: the same weights,
    to the bit (same seed, same data order, a schedule that does not depend on the run's length)."""
    _, history = training.trained_model("tiny", out_dir=str(tmp_path), snapshots=8)
    snapshots, _ = training.trained_snapshots("tiny", out_dir=str(tmp_path), snapshots=8)
    assert [s["step"] for s in snapshots] == [0, 1, 2, 4, 8, 15, 30, 60]
    cfg = profile_configs("tiny")[1]
    assert [s["tokens"] for s in snapshots] == [s["step"] * cfg.batch_size * 32 for s in snapshots]
    for step in (15, 30):
        shorter, _ = training.trained_model("tiny", out_dir=str(tmp_path / f"run{step}"), steps=step)
        snapshot = next(s["model"] for s in snapshots if s["step"] == step)
        assert all(torch.equal(a, b) for a, b in zip(snapshot.state_dict().values(), shorter.state_dict().values()))
    final, _ = training.trained_model("tiny", out_dir=str(tmp_path), snapshots=8)  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(snapshots[-1]["model"].state_dict().values(),
                                                  final.state_dict().values()))
    assert history["snapshot_seconds"] < history["seconds"]


def test_snapshots_are_found_again_without_training_and_a_missing_one_trains_again(tmp_path, monkeypatch):
    training.trained_model("tiny", out_dir=str(tmp_path), snapshots=4)
    path, _ = checkpoint_path("tiny", "softmax", 0, training.profile_data("tiny"), "cpu", str(tmp_path))
    calls = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    training.trained_model("tiny", out_dir=str(tmp_path), snapshots=4)
    assert calls == []  # all in the cache
    os.remove(training.snapshot_path(path, 8))
    training.trained_model("tiny", out_dir=str(tmp_path), snapshots=4)
    assert calls == [1] and os.path.exists(training.snapshot_path(path, 8))


def test_a_training_stopped_while_writing_a_snapshot_leaves_only_whole_files(tmp_path, monkeypatch):
    real_save = torch.save

    def save(payload, f):
        if payload.get("step") == 8:
            f.write(b"half a file")
            raise KeyboardInterrupt
        real_save(payload, f)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        training.trained_model("tiny", out_dir=str(tmp_path), snapshots=8)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [f.rsplit("-", 1)[1] for f in files] == ["step0.pt", "step1.pt", "step2.pt", "step4.pt"]  # no step8, no .tmp
    for f in files:
        training.read_checkpoint(str(tmp_path / "checkpoints" / f))  # each one whole

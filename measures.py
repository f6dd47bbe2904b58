"""
The paper's measures that several scripts share: small pure functions, tensor in, number or
tensor out, so that a test can feed them a hand-built pattern with a known answer.
"""
import torch


def row_normalized(pattern):
    """Sigmoid weights don't sum to one; measure them as shares: each row over its sum of |A|."""
    return pattern / pattern.abs().sum(-1, keepdim=True).clamp_min(1e-12)


def first_token_attention(pattern):
    """(B, H, T, T) attention -> (H,) mean weight on key 0 over queries t >= 1."""
    return row_normalized(pattern)[:, :, 1:, 0].mean(dim=(0, 2))


def dominance_ratio(x):
    """max_i |x_i| / mean_i |x_i| over the last dimension."""
    return x.abs().amax(-1) / x.abs().mean(-1).clamp_min(1e-12)


def massive_activation_ratio(x):
    """max_i |x_i| / median_i |x_i| over the last dimension (Sun et al. 2024)."""
    return x.abs().amax(-1) / x.abs().median(-1).values.clamp_min(1e-12)


def effective_rank(hidden):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of (N, D)."""
    s = torch.linalg.svdvals(hidden.double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


def row_norm_zscores(mlp):
    """(z of W_gate row norms, z of W_up row norms), each (ffn_dim,): one per hidden unit (Fig. 8)."""
    norms = [w.weight.detach().float().cpu().norm(dim=1) for w in (mlp.w_gate, mlp.w_up)]  # (ffn,) each
    return tuple((n - n.mean()) / n.std().clamp_min(1e-12) for n in norms)


def early_layers(n_layer):
    """Where the paper finds super neurons: the first layers (0 and 1; the first quarter of a deep model)."""
    return list(range(min(n_layer, max(2, n_layer // 4))))


def top_super_neuron(model):
    """(layer, unit): the FFN unit of the early layers with the largest z(W_gate row) + z(W_up row)."""
    def best(layer):
        z_gate, z_up = row_norm_zscores(model.blocks[layer].mlp)
        return float((z_gate + z_up).max()), layer, int((z_gate + z_up).argmax())
    _, layer, unit = max(best(layer) for layer in early_layers(model.config.n_layer))
    return layer, unit


def token0_unit(hidden_by_layer):
    """The FFN unit that fires most on token 0 against the others, found by its activations:
    {layer: (N, T, ffn) hidden activations} -> (layer, unit, mean |act| on token 0 / mean on t >= 1)."""
    best = (0.0, 0, 0)
    for layer, hidden in hidden_by_layer.items():
        ratio = hidden[:, 0].abs().mean(0) / hidden[:, 1:].abs().mean(dim=(0, 1)).clamp_min(1e-12)  # (ffn,)
        best = max(best, (float(ratio.max()), layer, int(ratio.argmax())))
    return best[1], best[2], best[0]


def variance_by_position(head_out):
    """(B, H, T, hd) head outputs -> two (T,) readings of their variance at each position:
    per dimension across sequences (var over B, mean over H, hd), and
    across dimensions within one token (var over hd, mean over B, H)."""
    across_sequences = head_out.var(dim=0).mean(dim=(0, 2))
    within_token = head_out.var(dim=-1).mean(dim=(0, 1))
    return across_sequences, within_token

"""The paper's ablation FFNs (--ffn=stem_gate, stem_add, hash_moe) against hand-written references:
each layer's output by hand from its own weights, hash routing, parameter and FLOP accounting from
hand formulas, the table machinery (dense, lazy, offloaded) for the two table variants, checkpoints,
and a few steps of training for each."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from model import GPT, HASH_SEED, HashMoE, STEMAdd, STEMGate, SwiGLU, configure_optimizer, parse_stem_layers
from offload import OffloadedTables
from tables import ResidentTables

VARIANTS = ["stem_gate", "stem_add", "hash_moe"]
TABLE_VARIANTS = ["stem_gate", "stem_add"]
KIND = dict(stem_gate=STEMGate, stem_add=STEMAdd, hash_moe=HashMoE)


def _cfg(ffn, **kw):
    return tiny_config(ffn=ffn, **{"moe_experts": 4, **kw})


# ---- layer outputs by hand -------------------------------------------------------------------


def _swiglu_by_hand(f, x):
    return (F.silu(x @ f.gate.weight.T) * (x @ f.up.weight.T)) @ f.down.weight.T


def _by_hand(f, x, ids):
    """y for one ablation layer, from its weights, written out per formula; hash-MoE position by position."""
    if isinstance(f, STEMGate):
        return (F.silu(f.table[ids]) * (x @ f.up.weight.T)) @ f.down.weight.T
    if isinstance(f, STEMAdd):
        return (F.silu(x @ f.gate.weight.T) * (x @ f.up.weight.T + f.table[ids])) @ f.down.weight.T
    y = torch.empty_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            y[b, t] = _swiglu_by_hand(f.experts[int(f.expert_of[ids[b, t]])], x[b, t])
    return y


@pytest.mark.parametrize("ffn", VARIANTS)
def test_layers_equal_their_formulas_inside_the_model(ffn):
    cfg = _cfg(ffn, stem_layers="1,3")
    m = GPT(cfg)
    for f in m.stem_ffns():
        torch.nn.init.normal_(f.table)  # rows as large as W_up x, so that a wrong formula shows
    assert [type(b.ffn) for b in m.blocks] == [SwiGLU, KIND[ffn], SwiGLU, KIND[ffn]]
    assert m.ffn_layers == [1, 3] and m.stem_layers == ([] if ffn == "hash_moe" else [1, 3])
    seen = {}
    for i, b in enumerate(m.blocks):
        b.ffn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], args[1], out)))
    idx = torch.randint(0, cfg.vocab_size, (3, 7))
    m(idx, torch.randint(0, cfg.vocab_size, idx.shape))
    with torch.no_grad():
        for i, b in enumerate(m.blocks):
            x, ids, out = seen[i]
            assert torch.equal(ids, idx)
            ref = _by_hand(b.ffn, x, ids) if i in (1, 3) else _swiglu_by_hand(b.ffn, x)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ffn", TABLE_VARIANTS)
def test_table_variants_look_up_through_stem_ids_and_stem_tables(ffn):
    # the path tables.py and offload.py use: the step's unique rows and the inverse index into them
    m = GPT(_cfg(ffn)).eval()
    idx = torch.randint(0, m.cfg.vocab_size, (2, 9))
    uniq, inv = torch.unique(idx, return_inverse=True)
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(idx, stem_ids=inv, stem_tables=[f.table[uniq] for f in m.stem_ffns()])
    assert torch.equal(a, b)


# ---- hash routing ------------------------------------------------------------------------------


def test_hash_moe_routes_each_id_to_its_fixed_expert():
    cfg = _cfg("hash_moe", vocab_size=50, stem_layers="1,2")
    E, V = cfg.moe_experts, cfg.vocab_size
    torch.manual_seed(1)
    m1 = GPT(cfg)
    torch.manual_seed(2)
    m2 = GPT(cfg)
    maps = [m.blocks[i].ffn.expert_of for m in (m1, m2) for i in m.ffn_layers]
    assert all(torch.equal(maps[0], mp) for mp in maps)  # fixed: not the global seed's, the same in every layer
    mp = maps[0]
    assert mp.shape == (V,) and mp.min() >= 0 and mp.max() < E
    assert torch.equal(mp, torch.randint(E, (V,), generator=torch.Generator().manual_seed(HASH_SEED)))
    assert not torch.equal(mp, torch.arange(V) % E)  # a random hash, not id mod E
    assert len(set(mp.tolist())) == E  # every expert gets ids
    big = HashMoE(_cfg("hash_moe", vocab_size=4096, moe_experts=16)).expert_of
    assert (big != torch.arange(4096) % 16).float().mean() > 0.8 and torch.bincount(big, minlength=16).min() > 150
    # behaviour: every id of the vocabulary in one batch, mixed experts; each position equals its
    # own expert's output and no other expert's
    f = m1.blocks[1].ffn
    ids = torch.randperm(V).view(2, V // 2)
    x = torch.randn(2, V // 2, cfg.n_embd)
    with torch.no_grad():
        y = f(x, ids)
        outs = torch.stack([_swiglu_by_hand(e, x) for e in f.experts])  # (E, B, T, d)
    match = (outs - y).abs().amax(-1) < 1e-6  # (E, B, T)
    assert (match.sum(0) == 1).all()
    assert torch.equal(match.float().argmax(0), mp[ids])


def test_hash_moe_gradient_reaches_only_the_routed_experts():
    cfg = _cfg("hash_moe", stem_layers="1")
    m = GPT(cfg)
    f = m.blocks[1].ffn
    ids = torch.tensor([[3, 3, 17, 3, 17]])
    m(ids, torch.zeros_like(ids))[1].backward()
    used = set(f.expert_of[ids].flatten().tolist())
    for k, e in enumerate(f.experts):
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
        assert got == (k in used), k
    assert f.expert_of.grad is None and not f.expert_of.is_floating_point()


def test_hash_moe_map_is_a_persistent_buffer_and_checkpoints_load():
    m = GPT(_cfg("hash_moe", stem_layers="1,3"))
    sd = m.state_dict()
    assert {k for k in sd if k.endswith("expert_of")} == {"blocks.1.ffn.expert_of", "blocks.3.ffn.expert_of"}
    assert not any(n.endswith("expert_of") for n, _ in m.named_parameters())
    sd["blocks.1.ffn.expert_of"] = sd["blocks.1.ffn.expert_of"].flip(0).clone()  # a checkpoint's own map wins
    other = GPT(m.cfg)
    other.load_state_dict(sd)  # strict: the keys match exactly
    assert torch.equal(other.blocks[1].ffn.expert_of, sd["blocks.1.ffn.expert_of"])


# ---- layers, specs ---------------------------------------------------------------------------


def test_variants_use_stem_layers_and_bad_names_fail():
    for ffn in VARIANTS:
        assert parse_stem_layers("third", 8, ffn) == [1, 4, 7]
        assert parse_stem_layers("half", 4, ffn) == [1, 3]
    assert parse_stem_layers("all", 4, "swiglu") == []
    with pytest.raises(ValueError, match="stem_gate"):
        parse_stem_layers("all", 4, "moe")
    with pytest.raises(ValueError, match="stem_layers"):
        parse_stem_layers("1,9", 4, "hash_moe")


# ---- accounting from hand formulas -----------------------------------------------------------


def _expected(cfg, ffn, n):
    """From the config numbers alone: n ablation layers, the other L - n SwiGLU."""
    V, d, h, L, E, T = cfg.vocab_size, cfg.n_embd, cfg.ffn_hidden, cfg.n_layer, cfg.moe_experts, cfg.block_size
    attn, swiglu = 4 * d * d, 3 * d * h  # qkv + proj; gate + up + down
    layer = dict(stem_gate=2 * d * h, stem_add=3 * d * h, hash_moe=E * 3 * d * h)[ffn]  # its matmul weights
    tables = dict(stem_gate=V * h, stem_add=V * h, hash_moe=0)[ffn]
    idle = (E - 1) * 3 * d * h if ffn == "hash_moe" else 0  # a token runs one expert of E
    c = dict(embedding=V * d, head=0 if cfg.tie_embeddings else V * d, tables=n * tables,
             matmul=L * attn + (L - n) * swiglu + n * layer, norms=(2 * L + 1) * d)
    c["total"] = sum(c.values())
    c["active"] = c["total"] - n * tables - n * idle
    # 2 FLOPs per multiply-add of the weights a token runs, the head always, attention over T x T
    flops = 2 * (L * attn + (L - n) * swiglu + n * (layer - idle) + V * d) + 4 * L * T * d
    return c, n * idle, flops


@pytest.mark.parametrize("ffn", VARIANTS)
@pytest.mark.parametrize("kw", [dict(stem_layers="all"), dict(stem_layers="1,3"),
                                dict(stem_layers="2", tie_embeddings=True), dict(stem_layers="third", moe_experts=3)])
def test_accounting_equals_hand_formulas(ffn, kw):
    cfg = _cfg(ffn, **kw)
    m = GPT(cfg)
    n = len(parse_stem_layers(cfg.stem_layers, cfg.n_layer, ffn))
    exp, idle, flops = _expected(cfg, ffn, n)
    c = m.param_counts()
    assert {k: c[k] for k in exp} == exp
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert c.get("experts_idle", 0) == idle
    assert m.flops_per_token() == flops
    # the comparisons the paper makes: hash-MoE costs SwiGLU's FLOPs, the gate variant STEM's,
    # the additive variant SwiGLU's (plus its tables)
    same = dict(hash_moe="swiglu", stem_gate="stem", stem_add="swiglu")[ffn]
    ref = GPT(tiny_config(**{**kw, "ffn": same}))
    assert m.flops_per_token() == ref.flops_per_token()
    if ffn == "hash_moe":
        assert c["active"] == ref.param_counts()["active"]


# ---- the table machinery: dense, lazy, offloaded ---------------------------------------------


def _batches(V, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, V // 2 + s, (2, 8), generator=g), torch.randint(0, V, (2, 8), generator=g))
             for _ in range(2)] for s in range(steps)]


def _train(m, placement, data, lr=1e-2):
    """train.py's step through the table interface: backbone AdamW + the tables' own optimizer."""
    tables = OffloadedTables(m, "cpu") if placement == "offload" else ResidentTables(m, "cpu", placement)
    opt = configure_optimizer(m, lr, 0.1)
    losses = []
    for mb in data:
        tables.prefetch([x for x, _ in mb])
        for (stem_ids, stem_tables), (x, y) in zip(tables.rows(), mb):
            _, loss = m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
            (loss / len(mb)).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        tables.step(lr, 1.0)
        opt.zero_grad(set_to_none=True)
    tables.sync()
    return tables, tables.state_dict(m), losses


@pytest.mark.parametrize("ffn", TABLE_VARIANTS)
def test_table_variants_train_dense_lazy_and_offloaded(ffn):
    cfg = _cfg(ffn, vocab_size=40, ffn_hidden=32, stem_layers="1,3")
    base = GPT(cfg)
    data = _batches(cfg.vocab_size, 4)
    runs = {p: _train(copy.deepcopy(base), p, data) for p in ("dense", "lazy", "offload")}
    names = ["blocks.1.ffn.table", "blocks.3.ffn.table"]
    init = base.state_dict()
    for p, (tables, sd, losses) in runs.items():
        assert tables.names == names and tables.n == 2, p
        assert set(sd) == set(init), p  # the same checkpoint keys in every placement
        for k in names:
            assert not torch.equal(sd[k], init[k]), (p, k)  # the tables were found and trained
    # lazy: only the rows of the batches moved; offloaded: bit-identical to resident lazy
    seen = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    seen[torch.cat([x.flatten() for mb in data for x, _ in mb])] = True
    lazy, off = runs["lazy"][1], runs["offload"][1]
    for k in names:
        assert torch.equal(lazy[k][~seen], init[k][~seen]) and (lazy[k][seen] != init[k][seen]).any(1).all()
    assert runs["lazy"][2] == runs["offload"][2]
    assert all(torch.equal(lazy[k], off[k]) for k in lazy)


@pytest.mark.parametrize("ffn", TABLE_VARIANTS)
def test_lazy_compact_gradients_equal_dense_gradient_rows(ffn):
    cfg = _cfg(ffn, vocab_size=40, ffn_hidden=32)
    m = GPT(cfg)
    dense = copy.deepcopy(m)
    tables = ResidentTables(m, "cpu", "lazy")
    mb = _batches(cfg.vocab_size, 1)[0]
    tables.prefetch([x for x, _ in mb])
    for (stem_ids, stem_tables), (x, y) in zip(tables.rows(), mb):
        m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1].backward()
        dense(x, y)[1].backward()
    uniq, leaves = tables.current
    assert len(leaves) == 3
    for leaf, f in zip(leaves, dense.stem_ffns()):
        torch.testing.assert_close(leaf.grad, f.table.grad[uniq], rtol=0, atol=1e-7)
    assert all(f.table.grad is None for f in m.stem_ffns())


def test_hash_moe_has_no_tables_and_trains_through_the_interface():
    cfg = _cfg("hash_moe", vocab_size=40, ffn_hidden=32, stem_layers="1,3")
    m = GPT(cfg)
    assert m.stem_ffns() == [] and not any(k.endswith("table") for k in m.state_dict())
    tables, sd, losses = _train(m, "lazy", _batches(cfg.vocab_size, 3))
    assert tables.n == 0 and set(sd) == set(GPT(cfg).state_dict())


# ---- each variant learns -------------------------------------------------------------------


@pytest.mark.parametrize("ffn", VARIANTS)
def test_each_variant_trains_on_a_repeating_batch(ffn):
    cfg = _cfg(ffn, stem_layers="1,3")
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randint(0, cfg.vocab_size, (4, 16), generator=g) for _ in range(2))
    losses = []
    for _ in range(20):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    for f in m.stem_ffns():
        assert f.table.grad is not None and f.table.grad.abs().sum() > 0

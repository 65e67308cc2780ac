"""tables.py against independent references: the dense table optimizer is torch's AdamW after
clipping, the lazy one is torch's fused AdamW applied to the present rows alone (and a float64 hand
formula), absent rows never move, and the compact (K, ffn_hidden) gradients equal the rows of the
dense gradient."""
import copy

import pytest
import torch

import tables
from conftest import tiny_config
from model import GPT
from tables import ResidentTables, RowAdamW, clip_joint_norm_, joint_norm, unique_ids

HYPER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _step_model(m, tables, xs, ys):
    """One training step of the tables through the interface, backbone untouched."""
    tables.prefetch(xs)
    for (stem_ids, stem_tables), x, y in zip(tables.rows(), xs, ys):
        _, loss = m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
        (loss / len(xs)).backward()
    return tables.step(1e-2, 1.0)


def _data(V, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [([torch.randint(0, V // 2 + s, (2, 8), generator=g) for _ in range(2)],
             [torch.randint(0, V, (2, 8), generator=g) for _ in range(2)]) for s in range(steps)]


def test_dense_tables_equal_clipping_then_torch_adamw():
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    m = GPT(cfg)
    ref = copy.deepcopy(m)
    tables = ResidentTables(m, "cpu", "dense", **HYPER)
    ref_tables = [f.table for f in ref.stem_ffns()]
    opt = torch.optim.AdamW(ref_tables, lr=1e-2, **HYPER)
    for xs, ys in _data(cfg.vocab_size, 4):
        norm = _step_model(m, tables, xs, ys)
        for x, y in zip(xs, ys):
            (ref(x, y)[1] / len(xs)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_tables, 1.0)
        opt.step()
        opt.zero_grad()
        for p in ref.parameters():
            p.grad = None
        assert torch.equal(norm, ref_norm)
    for a, b in zip([f.table for f in m.stem_ffns()], ref_tables):
        assert torch.equal(a, b)
    # every row moved (dense: momentum and decay reach rows absent from the batch)
    assert (m.stem_ffns()[0].table != GPT(cfg).stem_ffns()[0].table).all(1).all()


@pytest.mark.parametrize("threads,narrow", [(1, 1024), (1, 0), (3, 0)])  # gathered rows; row views, 1 or 3 threads
def test_row_adamw_equals_fused_adamw_on_present_rows_and_leaves_others(threads, narrow, monkeypatch):
    monkeypatch.setattr(tables, "NARROW", narrow)
    V, W, steps = 30, 48, 4
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(V, W, generator=g)
    opt = RowAdamW(p0.clone(), threads)
    assert opt.gather == (narrow > W)
    ref_p = p0.clone().double()
    ref_m, ref_v = torch.zeros(V, W, dtype=torch.float64), torch.zeros(V, W, dtype=torch.float64)
    for t in range(1, steps + 1):
        ids = torch.unique(torch.randint(0, V, (12,), generator=g))
        grad = torch.randn(len(ids), W, generator=g)
        before = [x.clone() for x in (opt.p, opt.m, opt.v)]
        # independent path: torch.optim.AdamW(fused=True) on a parameter holding just these rows
        q = torch.nn.Parameter(opt.p[ids].clone())
        ref = torch.optim.AdamW([q], lr=1e-2, fused=True, **HYPER)
        ref.state[q] = dict(step=torch.tensor(float(t - 1)), exp_avg=opt.m[ids].clone(), exp_avg_sq=opt.v[ids].clone())
        q.grad = grad.clone()
        ref.step()
        opt.update(ids, grad, t, 1e-2, **HYPER, g_rows=grad.unbind(0) if t % 2 else None)  # as offload hands them
        assert torch.equal(opt.p[ids], q.detach())
        assert torch.equal(opt.m[ids], ref.state[q]["exp_avg"]) and torch.equal(opt.v[ids], ref.state[q]["exp_avg_sq"])
        absent = torch.ones(V, dtype=torch.bool)
        absent[ids] = False
        for x, b in zip((opt.p, opt.m, opt.v), before):
            assert torch.equal(x[absent], b[absent])  # bit-identical
        # and the textbook formula in float64, row by row
        gd, b1, b2 = grad.double(), 0.9, 0.95
        ref_p[ids] *= 1 - 1e-2 * 0.1
        ref_m[ids] = b1 * ref_m[ids] + (1 - b1) * gd
        ref_v[ids] = b2 * ref_v[ids] + (1 - b2) * gd * gd
        mhat, vhat = ref_m[ids] / (1 - b1 ** t), ref_v[ids] / (1 - b2 ** t)
        ref_p[ids] -= 1e-2 * mhat / (vhat.sqrt() + 1e-8)
        torch.testing.assert_close(opt.p.double(), ref_p, rtol=1e-5, atol=1e-6)


def test_lazy_tables_equal_clipping_then_adamw_on_present_rows():
    """The lazy tables through the interface, with non-default hyperparameters and clipping that
    bites, against a float64 reference built from the dense model's gradient: the joint norm of the
    present rows, torch's clip factor, then AdamW with the global step count on those rows alone."""
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    m = GPT(cfg)
    dense = copy.deepcopy(m)
    hyper = dict(betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
    lr, max_norm, (b1, b2) = 2e-2, 0.02, hyper["betas"]
    tables = ResidentTables(m, "cpu", "lazy", **hyper)
    P = [f.table.detach().double().clone() for f in dense.stem_ffns()]
    M, V = [torch.zeros_like(p) for p in P], [torch.zeros_like(p) for p in P]
    for t, (xs, ys) in enumerate(_data(cfg.vocab_size, 4), 1):
        tables.prefetch(xs)
        for (stem_ids, stem_tables), x, y in zip(tables.rows(), xs, ys):
            (m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1] / len(xs)).backward()
            (dense(x, y)[1] / len(xs)).backward()
        norm = tables.step(lr, max_norm)
        uniq = unique_ids(xs)[0]
        grads = [f.table.grad[uniq].double() for f in dense.stem_ffns()]
        ref_norm = torch.cat([g.flatten() for g in grads]).norm()
        assert ref_norm > 2 * max_norm  # clipping is active
        torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-5, atol=0)
        coef = max_norm / (ref_norm + 1e-6)
        for p, mo, v, g, f in zip(P, M, V, grads, dense.stem_ffns()):
            g = g * coef
            p[uniq] *= 1 - lr * hyper["weight_decay"]
            mo[uniq] = b1 * mo[uniq] + (1 - b1) * g
            v[uniq] = b2 * v[uniq] + (1 - b2) * g * g
            p[uniq] -= lr * (mo[uniq] / (1 - b1 ** t)) / ((v[uniq] / (1 - b2 ** t)).sqrt() + hyper["eps"])
            f.table.data.copy_(p)  # the reference model follows the reference tables
        dense.zero_grad(set_to_none=True)
        m.zero_grad(set_to_none=True)
    for f, p in zip(m.stem_ffns(), P):
        torch.testing.assert_close(f.table.double(), p, rtol=1e-5, atol=1e-7)


def test_lazy_compact_gradients_equal_dense_gradient_rows():
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    m = GPT(cfg)
    dense = copy.deepcopy(m)
    tables = ResidentTables(m, "cpu", "lazy")
    xs, ys = _data(cfg.vocab_size, 1)[0]
    tables.prefetch(xs)
    for (stem_ids, stem_tables), x, y in zip(tables.rows(), xs, ys):
        m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1].backward()
        dense(x, y)[1].backward()
    uniq, leaves = tables.current
    assert torch.equal(uniq, unique_ids(xs)[0])
    for leaf, f in zip(leaves, dense.stem_ffns()):
        assert leaf.shape == (len(uniq), cfg.ffn_hidden)
        torch.testing.assert_close(leaf.grad, f.table.grad[uniq], rtol=0, atol=1e-7)
        rest = torch.ones(cfg.vocab_size, dtype=torch.bool)
        rest[uniq] = False
        assert (f.table.grad[rest] == 0).all()  # the dense gradient holds nothing else
    assert all(f.table.grad is None for f in m.stem_ffns())  # no (vocab, ffn_hidden) gradient was built


def test_lazy_tables_move_only_present_rows_and_state_round_trips():
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    m = GPT(cfg)
    init = [f.table.clone() for f in m.stem_ffns()]
    tables = ResidentTables(m, "cpu", "lazy")
    seen = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    for xs, ys in _data(cfg.vocab_size, 3):
        _step_model(m, tables, xs, ys)
        seen[torch.cat([x.flatten() for x in xs])] = True
    for t, t0 in zip([f.table for f in m.stem_ffns()], init):
        assert torch.equal(t[~seen], t0[~seen]) and (t[seen] != t0[seen]).all(1).all()
    sd = tables.optimizer_state_dict(1e-2)
    other = ResidentTables(GPT(cfg), "cpu", "lazy")
    other.load_optimizer_state_dict(sd)
    assert other.steps == 3
    for o, r in zip(other.opts, tables.opts):
        assert torch.equal(o.m, r.m) and torch.equal(o.v, r.v) and (r.m != 0).any()
    with pytest.raises(ValueError, match="table_optimizer=lazy"):
        ResidentTables(GPT(cfg), "cpu", "dense").load_optimizer_state_dict(sd)


def test_clip_joint_norm_equals_torch_clip_and_not_the_layout():
    g = [torch.randn(3000, 48), torch.randn(3000, 48)]
    packed = torch.cat(g, dim=1)  # offload's layout: the layers side by side in one (K, n_stem * ffn) buffer
    views = [packed[:, :48], packed[:, 48:]]
    ref = [x.clone().requires_grad_() for x in g]
    for r, x in zip(ref, g):
        r.grad = x.clone()
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    n = clip_joint_norm_(g, 0.5)
    # from per-row norms rather than per-tensor ones: torch's value up to rounding
    torch.testing.assert_close(n, n_ref, rtol=1e-6, atol=0)
    for a, r in zip(g, ref):
        torch.testing.assert_close(a, r.grad, rtol=1e-6, atol=0)
    # and the same bits from the blocks and from column views of the packed buffer (whole-tensor norms differ)
    assert torch.equal(joint_norm([x.clone() for x in views], 0.5)[0], joint_norm(views, 0.5)[0])
    assert torch.equal(joint_norm(views, 0.5)[0], joint_norm([p.contiguous() for p in views], 0.5)[0])


def test_prefetch_twice_raises():
    tables = ResidentTables(GPT(tiny_config()), "cpu", "lazy")
    tables.prefetch([torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(RuntimeError, match="prefetch"):
        tables.prefetch([torch.zeros(1, 4, dtype=torch.long)])


def _ddp_rank(rank, world, init, cfg, xs, ys, out):
    """One gloo rank: lazy tables with ddp=True, one step on its own micro-batch."""
    import torch.distributed as dist
    from common import ranks_agree
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    m = GPT(cfg)
    tables = ResidentTables(m, "cpu", "lazy", ddp=True, **HYPER)
    tables.prefetch([xs[rank]])
    [(stem_ids, stem_tables)] = tables.rows()
    m(xs[rank], ys[rank], stem_ids=stem_ids, stem_tables=stem_tables)[1].backward()
    norm = tables.step(1e-2, 1e9)
    agree = ranks_agree(m, world)
    if rank == 1:
        with torch.no_grad():
            m.stem_ffns()[0].table[0, 0] += 1.0
    disagree = ranks_agree(m, world)
    if rank == 0:
        torch.save(dict(norm=norm, tables=[f.table for f in m.stem_ffns()], agree=agree, disagree=disagree), out)
    dist.destroy_process_group()


def test_ddp_lazy_tables_equal_one_process_on_both_batches(tmp_path):
    """Two gloo ranks, each with its own micro-batch, against one process that sees both as two
    micro-batches of half weight: the union of ids, the averaged compact gradients, their norm and
    the updated rows agree; and ranks_agree tells equal weights from unequal ones."""
    import torch.multiprocessing as mp
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    xs, ys = _data(cfg.vocab_size, 1)[0]
    xs[1] = xs[1] + 20 * (xs[1] < 20)  # the ranks see different ids (the union matters)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path}/init", cfg, xs, ys, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    m = GPT(cfg)
    tables = ResidentTables(m, "cpu", "lazy", **HYPER)
    tables.prefetch(xs)
    for (stem_ids, stem_tables), x, y in zip(tables.rows(), xs, ys):
        (m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1] / 2).backward()
    norm = tables.step(1e-2, 1e9)
    torch.testing.assert_close(got["norm"], norm, rtol=1e-6, atol=0)
    for a, f in zip(got["tables"], m.stem_ffns()):
        torch.testing.assert_close(a, f.table, rtol=1e-6, atol=1e-7)
    assert got["agree"] and not got["disagree"]

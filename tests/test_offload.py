"""offload.py against the resident model: bit-identical training with the lazy optimizer, identical
logits and generations, checkpoint interchange, bad inputs; CUDA checks where a GPU exists."""
import copy
import os

import pytest
import torch

from conftest import TINY, _losses, _train_inproc, assert_user_error, run, tiny_config
from model import FFNS, GPT, configure_optimizer
from configurator import UserError
from offload import OffloadedTables, device_bytes
import tables
from tables import ResidentTables

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batches(V, steps, accum, B, T, seed):
    """Micro-batches whose unique counts change from step to step and that share ids across steps
    (a small 'hot' range every step, plus a random range of varying width)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        width = 3 + (s * 7) % (V - 3)
        hot = torch.randint(0, 4, (B, T), generator=g)
        wide = torch.randint(0, width, (B, T), generator=g)
        mb = [(torch.where(torch.rand(B, T, generator=g) < 0.5, hot, wide),
               torch.randint(0, V, (B, T), generator=g)) for _ in range(accum)]
        out.append(mb)
    return out


def _train_both(cfg, steps, accum=2, device="cpu", ctx=None, lr=1e-2, B=3, T=8, variants=("resident", "offload"),
                stall=False, queued=False, threads=None):
    """The same steps for each variant, through the one table interface, as train.py runs them:
    "resident" (ResidentTables, lazy), "offload" (the pipeline), "offload-sync" (the pipeline
    drained after every call: no overlap at all). Returns per variant the state dict and table
    optimizer state in the checkpoint format, the losses, and the tables object. stall=True keeps
    the GPU busy before each table step, to widen any race window. queued=True prefetches one more
    step after the last, so that the state is read (after sync) with a step queued, as at an eval."""
    ctx = ctx or torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    base = GPT(cfg)
    data = _batches(cfg.vocab_size, steps + queued, accum, B, T, seed=1)
    results = []
    for variant in variants:
        m = copy.deepcopy(base)
        if variant == "resident":
            tables = ResidentTables(m, device, "lazy")
        else:
            tables = OffloadedTables(m, device, threads=threads)
        drain = tables.sync if variant == "offload-sync" else (lambda: None)
        opt = configure_optimizer(m, lr, 0.1)
        losses = []
        tables.prefetch([x for x, _ in data[0]])
        drain()
        for s in range(steps):
            rows = tables.rows()
            if s + 1 < len(data):
                tables.prefetch([x for x, _ in data[s + 1]])
                drain()
            for (x, y), (stem_ids, stem_tables) in zip(data[s], rows):
                with ctx:
                    _, loss = m(x.to(device), y.to(device), stem_ids=stem_ids, stem_tables=stem_tables)
                (loss / accum).backward()
                losses.append(loss.detach())  # no .item() here: the GPU may run ahead of the host
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            if stall:
                torch.cuda._sleep(2_000_000)
            tables.step(lr, 1.0)
            drain()
            opt.zero_grad(set_to_none=True)
        losses = [v.item() for v in losses]
        tables.sync()
        results.append((tables.state_dict(m), tables.optimizer_state_dict(lr), losses, tables))
    return results


# RowAdamW: both gather; both on row views (offload's host work in 3 threads); one each
@pytest.mark.parametrize("narrow,threads", [(1024, None), (0, 3), (48, None)])
def test_training_offloaded_is_bit_identical_to_resident_lazy(narrow, threads, monkeypatch):
    # widths that are multiples of 16 keep every elementwise kernel on its vector path in both
    # layouts ((K, ffn) blocks resident, (K, n_stem * ffn) packed rows offloaded)
    monkeypatch.setattr(tables, "NARROW", narrow)
    cfg = tiny_config(vocab_size=40, ffn_hidden=32, stem_layers="1,3")
    seen = dict(fewer=0, groups=0)  # micro-batches with fewer rows than their step; update groups run
    add, update = OffloadedTables._add, OffloadedTables._update
    monkeypatch.setattr(OffloadedTables, "_add", lambda s, job, mb, *a: add(s, job, mb, *a) or seen.update(
        fewer=seen["fewer"] + (len(mb.uniq) < len(job.uniq))))
    monkeypatch.setattr(OffloadedTables, "_update", lambda *a: update(*a) or seen.update(groups=seen["groups"] + 1))
    # read with a step queued (its first rows fetched, the rest of the last update pending)
    sd_o = _assert_same(*_train_both(cfg, steps=8, queued=True, threads=threads), steps=8)
    # the data exercises every path: micro-batches that hold part of their step's rows, updates split
    # into groups by the next step's micro-batches (rows needed by its first, by its second, by none)
    assert seen["fewer"] > 8 and seen["groups"] > 2 * 8, seen
    # the tables really moved, and rows never seen are untouched
    torch.manual_seed(0)
    init = GPT(cfg).state_dict()["blocks.1.ffn.table"]
    changed = (sd_o["blocks.1.ffn.table"] != init).any(1)
    assert changed[:4].all() and changed.sum() < cfg.vocab_size or changed.all()


def _assert_same(resident, offload, steps):
    """Losses, weights and table moments of two _train_both results: the same bits. Returns offload's weights."""
    (sd_r, opt_r, loss_r, _), (sd_o, opt_o, loss_o, _) = resident, offload
    assert loss_r == loss_o
    assert sd_r.keys() == sd_o.keys()
    for k in sd_r:
        assert torch.equal(sd_r[k], sd_o[k]), k
    for i in opt_r["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_r["state"][i][key], opt_o["state"][i][key]), (i, key)
        assert opt_r["state"][i]["step"].item() == opt_o["state"][i]["step"].item() == steps
    return sd_o


@pytest.mark.parametrize("accum,ffn", [(1, "stem"), (3, "stem"), (3, "stem_gate")])
def test_offloaded_equals_resident_lazy_at_any_grad_accum_and_with_stem_gate(accum, ffn):
    # grad_accum 1: each step's single micro-batch holds all its rows; 3: a middle micro-batch that is neither
    # the first nor the last; stem_gate: the table row multiplies the gate's output instead of the up-projection
    cfg = tiny_config(vocab_size=40, ffn_hidden=32, stem_layers="1,3", ffn=ffn)
    _assert_same(*_train_both(cfg, steps=5, accum=accum, queued=True), steps=5)


@pytest.mark.parametrize("task", ["_add", "_update"])
def test_a_failed_host_task_is_raised(task, monkeypatch):
    """The first add (of a micro-batch that is not its step's last) or the first update group fails on the
    worker: the loop, step() or sync() raises it, rather than training going on with rows it never updated."""
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    data = _batches(cfg.vocab_size, 3, 3, 3, 8, seed=2)
    orig, calls = getattr(OffloadedTables, task), []

    def fails_once(self, *a):
        calls.append(task)
        if len(calls) == 1:
            raise OSError(f"{task} failed")
        return orig(self, *a)
    monkeypatch.setattr(OffloadedTables, task, fails_once)
    m = GPT(cfg)
    eng = OffloadedTables(m, "cpu")
    with pytest.raises(OSError, match=f"{task} failed"):
        eng.prefetch([x for x, _ in data[0]])
        for s in range(3):
            rows = eng.rows()
            if s + 1 < 3:
                eng.prefetch([x for x, _ in data[s + 1]])
            for (x, y), (stem_ids, stem_tables) in zip(data[s], rows):
                m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1].backward()
            eng.step(1e-2, 1.0)
        eng.sync()


def test_offloaded_model_holds_no_tables_and_state_dict_keys_match():
    cfg = tiny_config()
    m = GPT(cfg)
    keys = set(m.state_dict())
    eng = OffloadedTables(m, "cpu", train=False)
    assert all(f.table is None for f in m.stem_ffns())
    assert not any(k.endswith("table") for k in m.state_dict())
    assert set(eng.state_dict(m)) == keys
    assert eng.table.shape == (cfg.vocab_size, 3 * cfg.ffn_hidden)


def test_inference_logits_and_greedy_generation_identical_with_evicting_cache():
    cfg = tiny_config(vocab_size=64, block_size=64)
    torch.manual_seed(3)
    res = GPT(cfg).eval()
    torch.nn.init.normal_(res.lm_head.weight, std=1.0)  # varied greedy paths
    for f in res.stem_ffns():
        torch.nn.init.normal_(f.table)
    off = copy.deepcopy(res)
    eng = OffloadedTables(off, "cpu", train=False, cache_rows=6)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        a, _ = res(idx, torch.zeros_like(idx))
        stem_ids, stem_tables = eng.lookup(idx)
        b, _ = off(idx, torch.zeros_like(idx), stem_ids=stem_ids, stem_tables=stem_tables)
    assert torch.equal(a, b)
    eng.prefetch_prompt(idx, 4)
    ga = res.generate(idx, 30, temperature=0, prefill_chunk=4)
    gb = off.generate(idx, 30, temperature=0, stem_fn=eng.stem_fn, prefill_chunk=4)
    assert torch.equal(ga, gb)
    c = eng.cache
    assert len(set(ga[:, 11:].flatten().tolist())) > c.n  # more ids than slots: eviction happened
    assert c.misses > c.n and c.hits > 0
    for s, t in enumerate(c.id_of.tolist()):  # every slot holds the row of the id it claims
        assert torch.equal(c.buf[s], eng.table[t])


def test_cache_evicts_least_frequently_used_then_least_recent():
    m = GPT(tiny_config())
    eng = OffloadedTables(m, "cpu", train=False, cache_rows=3)
    c = eng.cache
    for t in (1, 1, 1, 2, 2, 3):  # freq: 1 -> 3, 2 -> 2, 3 -> 1
        c.rows(torch.tensor([[t]]))
    c.rows(torch.tensor([[4]]))  # evicts 3 (least frequent)
    assert set(c.slot_of) == {1, 2, 4}
    c.rows(torch.tensor([[2]]))  # 2 -> 3 uses; 4 has 1
    c.rows(torch.tensor([[5], [4]]))  # 4 is needed this step: 5 evicts the LFU of the others (2, 1: 3 each; 1 older)
    assert set(c.slot_of) == {2, 4, 5}
    assert (c.hits, c.misses) == (5, 5)
    for t, s in c.slot_of.items():
        assert torch.equal(c.buf[s], eng.table[t])


def test_second_prefetch_before_rows_raises_and_cache_refuses_training():
    m = GPT(tiny_config())
    eng = OffloadedTables(m, "cpu")
    eng.prefetch([torch.tensor([[1, 2]])])
    with pytest.raises(RuntimeError, match="prefetch"):
        eng.prefetch([torch.tensor([[3, 4]])])
    with pytest.raises(UserError, match="inference"):
        OffloadedTables(GPT(tiny_config()), "cpu", train=True, cache_rows=8)


def test_prefetch_between_rows_and_step_and_after_step_agree(monkeypatch):
    """The loop prefetches step i+1 after rows(i): the update of step i then runs in groups, in the order
    step i+1 needs its rows; a caller may also prefetch after step(i): one group. The same bits."""
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    data = _batches(cfg.vocab_size, 5, 3, 3, 8, seed=2)
    out, groups = [], []
    update = OffloadedTables._update
    monkeypatch.setattr(OffloadedTables, "_update", lambda *a: update(*a) or groups.append(a[2]))
    for late in (False, True):
        torch.manual_seed(0)
        m = GPT(cfg)
        eng = OffloadedTables(m, "cpu")
        eng.prefetch([x for x, _ in data[0]])
        for s in range(5):
            rows = eng.rows()
            if not late and s + 1 < 5:
                eng.prefetch([x for x, _ in data[s + 1]])
            for (x, y), (stem_ids, stem_tables) in zip(data[s], rows):
                m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1].backward()
            eng.step(1e-2, 1.0)
            if late and s + 1 < 5:
                eng.prefetch([x for x, _ in data[s + 1]])
        out.append(eng.state_dict(m))
        assert (len(groups) > 5) != late, len(groups)
        groups.clear()
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


def test_cache_smaller_than_one_step_is_an_error():
    m = GPT(tiny_config())
    eng = OffloadedTables(m, "cpu", train=False, cache_rows=1)
    with pytest.raises(UserError, match="offload_cache_rows"):
        eng.cache.rows(torch.tensor([[1], [2]]))


def test_offload_refuses_swiglu():
    with pytest.raises(UserError, match="STEM tables"):
        OffloadedTables(GPT(tiny_config(ffn="swiglu")), "cpu")


def test_device_bytes_counts_the_layers_that_hold_a_table():
    for ffn in FFNS:  # a table in each of cfg.ffn's layers (all but 0, in tiny_config) for the STEM variants only
        cfg = tiny_config(ffn=ffn)
        n = sum(k.endswith("ffn.table") for k in GPT(cfg).state_dict())
        assert n == (3 if ffn in ("stem", "stem_gate", "stem_add") else 0)
        assert device_bytes(cfg, 2, unique_per_micro=7, unique_per_step=9)["offload"] == 4 * 24 * n * 3 * 7


def _ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_train_script_offload_matches_resident_and_checkpoints_interchange(facts, tmp_path):
    common = [f"--data_dir={facts}", "--eval_interval=3", "--lr_decay_iters=6", "--eval_facts=False",
              "--table_optimizer=lazy", "--grad_accum=2", "--ffn_hidden=64", *TINY]
    d = {k: str(tmp_path / k) for k in ("res", "off", "res_then_off", "off_then_res")}
    _train_inproc(f"--out_dir={d['res']}", "--max_iters=6", *common)
    _train_inproc(f"--out_dir={d['off']}", "--max_iters=6", "--offload=True", *common)
    _train_inproc(f"--out_dir={d['res_then_off']}", "--max_iters=3", *common)
    _train_inproc(f"--out_dir={d['res_then_off']}", "--max_iters=6", "--init_from=resume", "--offload=True", *common)
    _train_inproc(f"--out_dir={d['off_then_res']}", "--max_iters=3", "--offload=True", *common)
    _train_inproc(f"--out_dir={d['off_then_res']}", "--max_iters=6", "--init_from=resume", *common)
    ref = _ckpt(d["res"])
    for name in ("off", "res_then_off", "off_then_res"):
        assert _losses(d[name]) == _losses(d["res"]), name
        ck = _ckpt(d[name])
        assert ck["model"].keys() == ref["model"].keys()
        for k in ref["model"]:
            assert torch.equal(ck["model"][k], ref["model"][k]), (name, k)
        for i, st in ref["optimizer"]["tables"]["state"].items():
            assert torch.equal(ck["optimizer"]["tables"]["state"][i]["exp_avg_sq"], st["exp_avg_sq"]), name
        assert torch.equal(ck["rng"]["data"], ref["rng"]["data"])


def test_sample_offload_equals_resident(trained):
    out, _ = trained
    args = [f"--out_dir={out}", "--greedy", "--num_samples=2", "--max_new_tokens=12", "--start=The capital of"]
    a = run("sample.py", *args).stdout
    b = run("sample.py", *args, "--offload=True", "--offload_cache_rows=4", "--prefill_chunk=2").stdout
    assert a.split("---")[:2] == b.split("---")[:2]
    assert "offload row cache: 4 rows, hit rate" in b


def test_offload_bad_inputs(facts, trained, tmp_path):
    assert_user_error(run("train.py", f"--data_dir={facts}", "--offload=True", "--table_optimizer=dense", ok=False),
                      "--table_optimizer=lazy")
    assert_user_error(run("train.py", f"--data_dir={facts}", "--offload=True", "--table_optimizer=lazy",
                          "--ffn=swiglu", ok=False), "offload needs STEM tables")
    out, _ = trained  # trained with the dense optimizer
    assert_user_error(run("train.py", f"--data_dir={facts}", f"--out_dir={out}", "--init_from=resume", "--offload=True",
                          "--table_optimizer=lazy", ok=False), "dense optimizer")
    assert_user_error(run("sample.py", f"--out_dir={out}", "--offload=True", "--start=The capital of", "--edit",
                          "capital=currency", "--edit_align=average", ok=False), "--edit_align=average")


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------

@cuda
def test_cuda_training_offloaded_matches_resident_bf16():
    cfg = tiny_config(vocab_size=512, ffn_hidden=64, n_embd=64, block_size=64)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    (sd_r, _, loss_r, _), (sd_o, _, loss_o, eng) = _train_both(cfg, steps=6, device="cuda", ctx=ctx, B=8, T=64)
    for a, b in zip(loss_r, loss_o):
        assert abs(a - b) < 2e-2 * max(1.0, abs(a))
    for k in sd_r:
        torch.testing.assert_close(sd_r[k].float().cpu(), sd_o[k].float().cpu(), rtol=2e-2, atol=2e-3)
    assert eng.stage.is_pinned()


@cuda
def test_cuda_no_table_storage_on_gpu():
    cfg = tiny_config(vocab_size=32768, ffn_hidden=256, n_embd=64)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    res = GPT(cfg).cuda()
    resident = torch.cuda.memory_allocated() - base
    del res
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    m = GPT(cfg)
    eng = OffloadedTables(m, "cuda")  # places the model
    offloaded = torch.cuda.memory_allocated() - base
    table_bytes = eng.table.numel() * eng.table.element_size()
    assert resident - offloaded >= table_bytes


def test_row_cache_is_capped_at_the_vocabulary():
    cfg = tiny_config()
    eng = OffloadedTables(GPT(cfg), "cpu", train=False, cache_rows=10**9)  # 10^9 slots would not fit in memory
    assert eng.cache.n == cfg.vocab_size

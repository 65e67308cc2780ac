"""What a GPU run of the tables needs, checked where a CPU can: the device bytes each placement holds
against offload.device_bytes's prediction (and the GPT-2-small preset's ratio), leaves that share no
autograd version counter with anything written later, one compile for steps of different sizes; and, on a
GPU, the paths a GPT-2-small run takes (wide packed rows, chunked prefill, a stress run)."""
import contextlib
import copy
import gc
import os
import runpy
import weakref

import pytest
import torch

from conftest import ROOT, tiny_config
from model import GPT, GPTConfig, configure_optimizer
from offload import OffloadedTables, device_bytes
from tables import ResidentTables

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _disjoint_batches(V, steps, accum, B, T, seed):
    """Micro-batches of B * T distinct ids each, disjoint within a step: k = B * T rows per micro-batch and
    K = accum * k per step, every step a different set."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randperm(V, generator=g)[:accum * B * T].view(accum, B, T)
        out.append([(x, torch.randint(0, V, (B, T), generator=g)) for x in ids])
    return out


def _step(m, tables, batches, after_backward=lambda: None):
    tables.prefetch([x for x, _ in batches])
    for (x, y), (stem_ids, stem_tables) in zip(batches, tables.rows()):
        (m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1] / len(batches)).backward()
        after_backward()
    tables.step(1e-2, 1.0)
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stem_layers", ["1,3", "all"])
def test_held_bytes_equal_the_prediction(stem_layers):
    # narrow rows (W < 1,024): RowAdamW gathers on the CPU as it does on CUDA, so the prediction holds here
    cfg = tiny_config(vocab_size=64, ffn_hidden=32, stem_layers=stem_layers)
    B, T, accum = 2, 8, 3
    data = _disjoint_batches(cfg.vocab_size, 3, accum, B, T, seed=0)
    want = device_bytes(cfg, B, T, accum)
    assert want == device_bytes(cfg, B, T, accum, unique_per_micro=B * T, unique_per_step=accum * B * T)
    W = len(GPT(cfg).stem_layers) * cfg.ffn_hidden
    assert want["offload"] == 3 * B * T * W * 4  # by hand: two micro-batches of leaves and one of gradients
    for placement, key in ((ResidentTables, "resident_lazy"), (OffloadedTables, "offload")):
        m = GPT(cfg)
        tables = placement(m, "cpu", "lazy")
        held = []
        for batches in data:  # the resident update block appears at the first step: measured from the second
            _step(m, tables, batches, lambda: held.append(tables.held_bytes()))
        assert max(held[accum:]) == want[key], (key, held)


def _train_order(m, eng, data, after=lambda: None, device="cpu"):
    """data's steps (CPU ids) in train.py's order: the next step prefetched after micro-batch 0's backward, the
    tables stepped after the last; after() after every backward and step."""
    eng.prefetch([x for x, _ in data[0]])
    for s, batches in enumerate(data):
        for j, ((x, y), (stem_ids, stem_tables)) in enumerate(zip(batches, eng.rows())):
            (m(x.to(device), y.to(device), stem_ids=stem_ids, stem_tables=stem_tables)[1] / len(batches)).backward()
            if j == 0 and s + 1 < len(data):
                eng.prefetch([x for x, _ in data[s + 1]])
            after()
        eng.step(1e-2, 1.0)
        m.zero_grad(set_to_none=True)
        after()


def test_offload_keeps_at_most_three_micro_batches_of_leaves_alive(monkeypatch):
    """The leaf tensors really alive (weak references to every leaf the engine makes, after gc), after every
    backward and step of a grad_accum 6 run: at most three micro-batches' (device_bytes' bound), not a number
    that grows with grad_accum."""
    cfg = tiny_config(vocab_size=64, ffn_hidden=32)
    m = GPT(cfg)
    eng = OffloadedTables(m, "cpu")
    made, alive, load = [], [], eng._load

    def traced(mb):
        out = load(mb)
        made.extend(weakref.ref(t) for t in out[0])
        return out
    monkeypatch.setattr(eng, "_load", traced)

    def count():
        eng.sync()  # every queued gather has run
        if sum(r() is not None for r in made) > 3 * eng.n:
            gc.collect()  # only what references keep alive counts (slow: only where it matters)
        alive.append(sum(r() is not None for r in made) / eng.n)
    _train_order(m, eng, _disjoint_batches(cfg.vocab_size, 4, 6, 2, 4, seed=2), count)
    assert 2 <= max(alive) <= 3, alive


def test_offload_holds_a_quarter_of_resident_at_the_gpt2_small_preset():
    p = runpy.run_path(os.path.join(ROOT, "presets", "gpt2_small_stem.py"))
    cfg = GPTConfig(vocab_size=50257, **{k: p[k] for k in ("n_layer", "n_head", "n_embd", "ffn_hidden", "block_size",
                                                            "ffn", "stem_layers")})
    worst = device_bytes(cfg, p["batch_size"], cfg.block_size, p["grad_accum"])  # every count at its bound
    assert worst["offload"] <= 0.25 * worst["resident_lazy"], worst
    # and at web text's counts (about 5k ids per 16k-token micro-batch, 30k per step): smaller still
    web = device_bytes(cfg, p["batch_size"], cfg.block_size, p["grad_accum"], 5_000, 30_000)
    assert web["offload"] <= 0.06 * web["resident_lazy"], web


def test_offload_leaves_own_their_storage_and_version_counter():
    """A leaf the model saved for backward must not be bumped by the engine's later writes (a compiled
    backward that saved it would fail with 'modified by an inplace operation'): the leaves of the first
    micro-batch keep version 0 through the rest of the step, the update and the next step's fetches; each has
    a storage of its own, freed once its gradient is sent (a caller that still holds it holds no memory)."""
    cfg = tiny_config(vocab_size=40, ffn_hidden=32)
    data = _disjoint_batches(cfg.vocab_size, 2, 2, 2, 4, seed=1)
    m = GPT(cfg)
    eng = OffloadedTables(m, "cpu")
    eng.prefetch([x for x, _ in data[0]])
    rows = eng.rows()
    eng.prefetch([x for x, _ in data[1]])
    first = None
    for (x, y), (stem_ids, stem_tables) in zip(data[0], rows):
        if first is None:
            first, ptrs = stem_tables, {t.untyped_storage().data_ptr() for t in stem_tables}
        m(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1].backward()
    eng.step(1e-2, 1.0)
    eng.sync()
    assert all(leaf._version == 0 for leaf in first)
    assert len(ptrs) == len(first)  # one storage per layer
    assert all(leaf.untyped_storage().nbytes() == 0 for leaf in first)


@pytest.mark.parametrize("placement", ["resident", "offload"])
def test_compiled_model_compiles_once_for_steps_of_different_sizes(placement):
    import torch._dynamo  # the engine marks its leaves dynamic once dynamo is loaded (torch.compile loads it)
    cfg = tiny_config(vocab_size=64, ffn_hidden=32)
    frames = []

    def backend(gm, inputs):  # counts the graphs dynamo compiles
        frames.append(gm)
        return gm.forward
    torch._dynamo.reset()
    m = GPT(cfg)
    tables = ResidentTables(m, "cpu", "lazy") if placement == "resident" else OffloadedTables(m, "cpu")
    compiled = torch.compile(m, backend=backend)
    g = torch.Generator().manual_seed(0)
    sizes, counts = set(), []
    for width in (8, 20, 40, 64):  # a different number of unique ids each step (and micro-batch)
        xs = [torch.randint(0, width, (2, 8), generator=g) for _ in range(2)]
        sizes |= {len(torch.unique(x)) for x in xs} | {len(torch.unique(torch.cat(xs)))}
        _step(compiled, tables, [(x, x) for x in xs], lambda: counts.append(len(frames)))
    assert len(sizes) > 4 and counts[0] >= 1 and counts[-1] == counts[0], (sizes, counts)
    one = torch.full((2, 8), 5)
    _step(compiled, tables, [(one, one)])  # K = 1: a dimension of size 1 is specialised (recompiled), no error
    torch._dynamo.reset()


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------


def _train(cfg, data, device, variant, lr=1e-2, max_norm=1e9, stall=False):
    """The steps of `data` for one placement ("resident", "offload", or "offload-sync": drained after every
    call); returns the model and tables state dicts in the checkpoint format."""
    torch.manual_seed(0)
    m = GPT(cfg)
    tables = ResidentTables(m, device, "lazy") if variant == "resident" else OffloadedTables(m, device)
    drain = tables.sync if variant == "offload-sync" else (lambda: None)
    opt = configure_optimizer(m, lr, 0.1)
    tables.prefetch([x for x, _ in data[0]])
    for s, batches in enumerate(data):
        rows = tables.rows()
        if s + 1 < len(data):
            tables.prefetch([x for x, _ in data[s + 1]])
            drain()
        for (x, y), (stem_ids, stem_tables) in zip(batches, rows):
            (m(x.to(device), y.to(device), stem_ids=stem_ids, stem_tables=stem_tables)[1] / len(batches)).backward()
            drain()
        opt.step()
        if stall:
            torch.cuda._sleep(2_000_000)  # the GPU busy: every copy and host task races it
        assert tables.step(lr, max_norm).is_cuda  # beside the loss, as train.py stacks them
        drain()
        opt.zero_grad(set_to_none=True)
    tables.sync()
    return tables.state_dict(m), tables.optimizer_state_dict(lr), tables


def _adamw_tolerance(p, lr):
    """How far the CPU and the CUDA fused AdamW kernels may put a float32 value apart after one step from the
    same p, m = v = 0 and gradient g: each evaluates p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps), in
    its own order, with at most 8 roundings, each of relative size <= 2^-24 (round to nearest), on terms of
    size <= |p| or <= lr * |m_hat| / (sqrt(v_hat) + eps) = lr * |g| / (|g| + eps) <= lr at the first step. So
    |difference| <= 8 * 2^-24 * (|p| + lr), p the value before the step (<= |p after| + lr, hence the 2 * lr
    below), and no more: the gradients are the same bits in both runs (one step, each id once per step, the
    clip factor exactly 1 with max_norm 1e9)."""
    return 8 * 2.0 ** -24 * (p.abs() + 2 * lr)


@contextlib.contextmanager
def _deterministic():
    """CUDA kernels that give the same bits run after run (embedding and index backward without atomics)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@cuda
def test_cuda_wide_packed_rows_offload_matches_resident():
    # GPT-2-small's packed row: 4 STEM layers x 2,048 = 8,192 values, the host update on row views (threads)
    cfg = tiny_config(vocab_size=256, n_layer=5, n_embd=64, n_head=2, ffn_hidden=2048, stem_layers="1,2,3,4")
    data = _disjoint_batches(cfg.vocab_size, 1, 2, 4, 16, seed=3)
    with _deterministic():
        (sd_r, opt_r, _), (sd_o, opt_o, eng) = (_train(cfg, data, "cuda", v) for v in ("resident", "offload"))
    assert eng.W == 8192 and not eng.opt.gather
    for k in sd_r:  # one step from the same state: the backbone and gradients agree bit for bit
        a, b = sd_r[k].cpu(), sd_o[k].cpu()
        if k.endswith("table"):
            assert ((a - b).abs() <= _adamw_tolerance(a, 1e-2)).all(), k
        else:
            assert torch.equal(a, b), k
    used, row = eng.stage.numel() * 4, len(eng.stage) * eng.W * 4  # bytes: the pinned block, a row in every plane
    assert eng.stage.is_pinned() and (1 << (used - 1).bit_length()) - used < row  # the allocator's rounding: < a row


@cuda
def test_cuda_prefill_with_prefill_chunk_equals_resident():
    cfg = tiny_config(vocab_size=512, block_size=64, n_embd=64, ffn_hidden=256)
    torch.manual_seed(3)
    res = GPT(cfg).eval()
    torch.nn.init.normal_(res.lm_head.weight, std=1.0)  # varied greedy paths
    off = copy.deepcopy(res)
    res.cuda()
    eng = OffloadedTables(off, "cuda", train=False, cache_rows=32)
    idx = torch.randint(0, cfg.vocab_size, (4, 40), device="cuda")
    eng.prefetch_prompt(idx, 8)
    a = res.generate(idx, 16, temperature=0, prefill_chunk=8)
    b = off.generate(idx, 16, temperature=0, stem_fn=eng.stem_fn, prefill_chunk=8)
    assert torch.equal(a, b)
    assert not eng.prompt_jobs  # every prefetched chunk was used


@cuda
def test_cuda_stress_overlapped_equals_drained_and_resident_within_adamw_rounding():
    """Many steps, the GPU stalled before each table step so that the pipeline has every chance to overwrite
    a buffer in use: overlapped offload equals the same engine drained after every call, bit for bit. Against
    resident (CUDA AdamW instead of the host's), after one step from the same state, within the two kernels'
    rounding (_adamw_tolerance)."""
    with _deterministic():
        cfg = tiny_config(vocab_size=300, ffn_hidden=64, n_embd=32)
        data = _disjoint_batches(cfg.vocab_size, 40, 3, 4, 8, seed=4)
        (sd_o, opt_o, _), (sd_s, opt_s, _) = (_train(cfg, data, "cuda", v, max_norm=1.0, stall=True)
                                              for v in ("offload", "offload-sync"))
        (sd_r1, _, _), (sd_o1, _, _) = (_train(cfg, data[:1], "cuda", v) for v in ("resident", "offload"))
    for k in sd_o:
        assert torch.equal(sd_o[k].cpu(), sd_s[k].cpu()), k
    for i, st in opt_o["state"].items():
        assert torch.equal(st["exp_avg_sq"], opt_s["state"][i]["exp_avg_sq"])
    for k in (k for k in sd_r1 if k.endswith("table")):
        a, b = sd_r1[k].cpu(), sd_o1[k].cpu()
        assert ((a - b).abs() <= _adamw_tolerance(a, 1e-2)).all(), k


@cuda
def test_cuda_offload_memory_does_not_grow_with_grad_accum():
    """The CUDA allocator's peak over three steps in train.py's order, above what the model holds before
    them, at grad_accum 8 and 1 (the same micro-batch shape: the same activations and backbone gradients).
    device_bytes predicts three micro-batches of rows (k = 1,024 ids, W = 3 STEM layers x 512: 6 MiB each)
    whatever grad_accum; grad_accum 1 holds two (no next micro-batch in its step), so 8 may hold one more, plus
    1 MiB of slack for the allocator's rounding and the ids. Each micro-batch of rows kept longer adds 6 MiB."""
    cfg = tiny_config(vocab_size=8192, block_size=256, n_embd=64, ffn_hidden=512)
    one = device_bytes(cfg, 4, 256, 8)["offload"] // 3  # one micro-batch of rows: 4 x 256 distinct ids
    peaks = {}
    for accum in (1, 8):
        torch.manual_seed(0)
        m = GPT(cfg)
        eng = OffloadedTables(m, "cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _train_order(m, eng, _disjoint_batches(cfg.vocab_size, 3, accum, 4, 256, seed=5), device="cuda")
        eng.sync()
        peaks[accum] = torch.cuda.max_memory_allocated() - base
        del m, eng
        gc.collect()
    assert one == 1024 * 3 * 512 * 4
    assert peaks[8] <= peaks[1] + one + 2**20, (peaks, one)

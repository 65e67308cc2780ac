"""bench.py's claim modes (spread, stability, context, locality): the pure functions against independent
references, and each mode's JSON on tiny runs (the modes run in-process; one subprocess checks the
error line)."""
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from conftest import TINY, _train_inproc, assert_user_error, run, tiny_config

import bench
from common import Batches, load_meta
from configurator import UserError
from model import GPT


def bench_json(capsys, *args):
    capsys.readouterr()
    bench.main(list(args))
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def swiglu_run(facts, tmp_path_factory):
    """The `trained` fixture's run with SwiGLU FFNs (same data, same steps)."""
    out = str(tmp_path_factory.mktemp("swiglu"))
    _train_inproc(f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3", "--ffn=swiglu", *TINY)
    return out


@pytest.fixture(scope="module")
def deep_stem(facts, tmp_path_factory):
    """A 3-layer STEM run with a table in layer 1: attention in layer 2 carries an edit to other positions."""
    out = str(tmp_path_factory.mktemp("deep"))
    _train_inproc(f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=6", *TINY,
                  "--n_layer=3", "--stem_layers=1")
    return out


# ---- pure functions against independent references


def direct_stats(x):
    """|cos| of every pair by a double loop; median and linear-interpolated 95th percentile by hand."""
    vals = []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            ni, nj = math.sqrt(sum(v * v for v in x[i])), math.sqrt(sum(v * v for v in x[j]))
            vals.append(abs(sum(a * b for a, b in zip(x[i], x[j]))) / (ni * nj))
    vals.sort()
    n = len(vals)
    median = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
    r = 0.95 * (n - 1)
    lo = int(math.floor(r))
    p95 = vals[lo] + (r - lo) * (vals[min(lo + 1, n - 1)] - vals[lo])
    return median, p95


def test_pairwise_abs_cos_stats_against_a_double_loop():
    rng = np.random.default_rng(3)
    for n, d in ((2, 3), (7, 5), (10, 4)):  # n(n-1)/2 = 1, 21 (odd count), 45 pairs
        x = rng.normal(size=(n, d)) + 0.3  # a shared offset: |cos| well away from 0
        s = bench.pairwise_abs_cos_stats(x)
        median, p95 = direct_stats(x.tolist())
        assert abs(s["median"] - median) < 1e-12 and abs(s["p95"] - p95) < 1e-12, (n, s, median, p95)
    assert bench.pairwise_abs_cos_stats(np.eye(5) * 3) == dict(median=0.0, p95=0.0)  # orthogonal rows
    ones = bench.pairwise_abs_cos_stats(np.array([[1.0, 2.0], [-2.0, -4.0], [0.5, 1.0]]))  # parallel, either sign
    assert abs(ones["median"] - 1) < 1e-12 and abs(ones["p95"] - 1) < 1e-12
    assert len(bench.pairwise_abs_cos(rng.normal(size=(6, 3)))) == 15
    with pytest.raises(ValueError):
        bench.pairwise_abs_cos_stats(np.ones((1, 4)))


def test_heaps_fit_recovers_a_known_law():
    T = [16 * 2 ** i for i in range(9)]
    k, beta = bench.heaps_fit(T, [3 * t ** 0.6 for t in T])
    assert abs(k - 3) < 1e-9 and abs(beta - 0.6) < 1e-12
    noisy = [3 * t ** 0.6 * math.exp(0.05 * math.sin(7 * i)) for i, t in enumerate(T)]  # +-5% wiggle
    k, beta = bench.heaps_fit(T, noisy)
    assert abs(beta - 0.6) < 0.02 and abs(k - 3) < 0.3


def test_mean_distinct_on_sequences_with_known_counts():
    rng = np.random.default_rng(0)
    assert bench.mean_distinct(np.arange(5000), 256, 20, rng) == 256  # all distinct: D = T
    assert bench.mean_distinct(np.arange(5000) % 7, 64, 20, rng) == 7  # period 7: D = 7 for T >= 7
    assert bench.mean_distinct(np.arange(5000) % 7, 3, 20, rng) == 3
    # Heaps on a sequence whose windows hold exactly min(T, 100) ids: beta 1 below 100, 0 above
    k, beta = bench.heaps_fit([16, 32, 64], [bench.mean_distinct(np.arange(5000) % 100, t, 10, rng) for t in (16, 32, 64)])
    assert abs(beta - 1) < 1e-12 and abs(k - 1) < 1e-9


def test_count_spikes_on_a_hand_made_loss_list():
    nan = float("nan")
    #         0    1    2    3    4    5    6    7    8    9   10   11   12   13
    losses = [9.0, 5.0, 5.0, 5.0, 5.0, 5.6, 5.0, 5.0, 5.5, 5.4, nan, 5.0, 6.0, 5.2]
    # window 3, margin 0.5: t=3 (median of 9,5,5 = 5): 5.0 no; t=5: 5.6 > 5 + 0.5 yes; t=8: 5.5 is not above 5.5;
    # t=9: 5.4 no; t=10: not finite, yes; t=11: median of the finite 5.5, 5.4 = 5.45, 5.0 no;
    # t=12: median of 5.4, 5.0 = 5.2, 6.0 > 5.7 yes; t=13: median of 5.0, 6.0 = 5.5, 5.2 no. Steps 0-2: never.
    assert bench.count_spikes(losses, window=3, margin=0.5) == [5, 10, 12]
    # margin 0.05: also t=8 (5.5 > 5.0 + 0.05) and t=9 (median of 5.0, 5.0, 5.5 = 5.0; 5.4 > 5.05)
    assert bench.count_spikes(losses, window=3, margin=0.05) == [5, 8, 9, 10, 12]
    assert bench.count_spikes(losses, window=20, margin=0.5) == []  # shorter than the window
    assert bench.count_spikes([10.0 - 0.1 * i for i in range(50)]) == []  # a falling loss has none
    ex = dict(bench.running_excess(losses, 3))
    assert ex[10] == math.inf and abs(ex[5] - 0.6) < 1e-12 and abs(ex[12] - 0.8) < 1e-12


def test_position_losses_average_to_the_model_loss():
    model = GPT(tiny_config(block_size=8)).eval()
    x, y = torch.randint(0, 50, (5, 8)), torch.randint(0, 50, (5, 8))
    pl = bench.position_losses(model, x, y, nullcontext(), chunk=2)  # chunks of 2, 2, 1 windows
    assert pl.shape == (5, 8) and pl.dtype == torch.float64
    assert abs(pl.mean().item() - model(x, y)[1].item()) < 1e-5
    assert torch.allclose(pl[3], bench.position_losses(model, x[3:4], y[3:4], nullcontext())[0])


def test_swap_rows_acts_only_where_the_rows_are_read():
    model = GPT(tiny_config(n_layer=3, stem_layers="1")).eval()  # attention in layer 2 follows the table
    before = [f.table.detach().clone() for f in model.stem_ffns()]
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = model(x, x)[0]
    bench.swap_rows(model, [40, 41], [42, 43])  # ids not in x
    assert torch.equal(model.stem_ffns()[0].table[40], before[0][42])
    assert torch.equal(model(x, x)[0], base)  # bitwise: rows never read change nothing
    bench.swap_rows(model, [40, 41], [42, 43])  # twice restores
    assert all(torch.equal(f.table, b) for f, b in zip(model.stem_ffns(), before))
    bench.swap_rows(model, [2], [30])  # id 2 is at position 1
    changed = (model(x, x)[0] - base).abs().amax(-1)[0]
    assert changed[0] == 0 and (changed[1:] > 0).all()  # causal: position 0 untouched, 1 and after change


# ---- the modes


def test_spread_mode(trained, swiglu_run, facts, tmp_path, capsys):
    out, _ = trained
    res, text = bench_json(capsys, "--mode=spread", f"--ckpt={out}", f"--ckpt_swiglu={swiglu_run}", "--device=cpu",
                           f"--plot_dir={tmp_path}", "--spread_ids=64")
    sp = res["spread"]
    assert set(sp) == {"trained", "init", "random", "swiglu_up"} and res["mode"] == "spread"
    for v in sp.values():
        assert set(v) == {"median", "p95"} and 0 <= v["median"] <= v["p95"] <= 1
    assert res["layer"] == 1 and [e["layer"] for e in res["per_layer"]] == [1] and res["ids"] == 64
    # Gaussian vectors of width 64: median |cos| about 0.674 / 8, P95 about 1.96 / 8 (2,016 pairs)
    assert abs(sp["random"]["median"] - 0.674 / 8) < 0.012 and abs(sp["random"]["p95"] - 1.96 / 8) < 0.03
    assert sp["swiglu_up"]["median"] > sp["random"]["median"]  # W_up x of real tokens share a direction
    assert os.path.isfile(tmp_path / "spread_abs_cos_cdf.png") and "SwiGLU W_up x" in text
    # the top ids are the most frequent of train.bin, by a direct count
    meta = load_meta(facts)
    data = np.fromfile(os.path.join(facts, "train.bin"), dtype=meta["dtype"])
    ids, _ = bench.top_ids(facts, meta, 5)
    counts = np.bincount(data, minlength=meta["vocab_size"])
    assert sorted(counts[ids].tolist(), reverse=True) == sorted(counts.tolist(), reverse=True)[:5]


def test_spread_init_is_the_runs_own_init(facts, tmp_path, capsys):
    # a 0-step run saves its initial weights: bench's "init" (a fresh GPT, the run's seed) must equal them exactly
    out = str(tmp_path / "zero")
    _train_inproc(f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=0", "--seed=7", *TINY)
    res, _ = bench_json(capsys, "--mode=spread", f"--ckpt={out}/ckpt.pt", "--device=cpu", f"--plot_dir={tmp_path}")
    assert res["spread"]["init"] == res["spread"]["trained"] and res["spread"]["swiglu_up"] is None
    assert res["spread"]["random"] != res["spread"]["init"]


def test_stability_mode(facts, tmp_path, capsys):
    args = ["--mode=stability", f"--data_dir={facts}", f"--stability_dir={tmp_path / 'runs'}", f"--plot_dir={tmp_path}",
            "--stability_steps=4", "--spike_window=2", "--stability_lrs=2", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--ffn_hidden=64", "--block_size=32", "--batch_size=4", "--moe_experts=2", "--stem_layers=1", "--device=cpu"]
    res, text = bench_json(capsys, *args)
    st = res["stability"]
    assert st["window"] == 2 and st["margin"] == 0.5 and "median" in st["definition"] and "a spike is" in text
    assert [(s["ffn"], s["lr_mult"]) for s in st["summary"]] == [("swiglu", 2.0), ("stem", 2.0), ("hash_moe", 2.0)]
    for r in st["runs"]:
        rows = [json.loads(line) for line in open(os.path.join(r["out_dir"], "metrics.jsonl"))]
        losses = [row["loss"] for row in sorted((row for row in rows if row["kind"] == "train"), key=lambda q: q["iter"])]
        assert r["losses"] == losses and r["steps"] == 4
        assert r["spikes"] == len(bench.count_spikes(losses, 2, 0.5))
        cfg = torch.load(os.path.join(r["out_dir"], "ckpt.pt"), weights_only=True)["config"]
        assert cfg["model"]["ffn"] == r["ffn"] and cfg["model"]["n_embd"] == 32
        assert cfg["train"]["learning_rate"] == 2e-3 and abs(cfg["train"]["min_lr"] - 2e-4) < 1e-15  # 2x the preset's
    assert os.path.isfile(tmp_path / "stability_lr2x.png")
    res2, text = bench_json(capsys, *args)  # finished runs are reused, not retrained
    assert "reused" in text and [r["losses"] for r in res2["stability"]["runs"]] == [r["losses"] for r in st["runs"]]
    with pytest.raises(UserError, match="other settings"):
        bench.main(args + ["--stability_steps=5"])


def test_context_mode(trained, swiglu_run, facts, tmp_path, capsys):
    out, _ = trained
    res, text = bench_json(capsys, "--mode=context", f"--ckpt={out}", f"--ckpt_swiglu={swiglu_run}", "--device=cpu",
                           f"--plot_dir={tmp_path}", "--context_max=256", "--context_windows=20", "--context_batches=2",
                           "--batch_size=3")
    c = res["context"]
    assert c["T"] == [16, 32, 64, 128, 256] and len(c["distinct"]) == 5 and c["data_dir"] == facts
    assert all(1 <= d <= t for d, t in zip(c["distinct"], c["T"])) and c["distinct"] == sorted(c["distinct"])
    assert (c["heaps_k"], c["heaps_beta"]) == bench.heaps_fit(c["T"], c["distinct"]) and 0 < c["heaps_beta"] < 1
    assert len(c["diff"]) == 32 and all(abs(d - (s - w)) < 1e-12 for d, s, w in zip(c["diff"], c["loss_stem"], c["loss_swiglu"]))
    assert abs(c["slope"] - np.polyfit(np.arange(32), c["diff"], 1)[0]) < 1e-12 and c["slope_se"] > 0
    # the per-position losses average to each model's own loss on the same validation windows
    from common import load_checkpoint, model_from_checkpoint
    meta = load_meta(facts)
    for path, key in ((out, "loss_stem"), (swiglu_run, "loss_swiglu")):
        model = model_from_checkpoint(load_checkpoint(os.path.join(path, "ckpt.pt"))).eval()
        batches, gen = Batches(facts, meta, 32, 3, "cpu", seed=0), torch.Generator().manual_seed(0)
        with torch.no_grad():
            ref = np.mean([model(*batches.get("val", gen))[1].item() for _ in range(2)])
        assert abs(np.mean(c[key]) - ref) < 1e-5, (key, np.mean(c[key]), ref)
    assert os.path.isfile(tmp_path / "context_distinct_ids.png") and os.path.isfile(tmp_path / "context_loss_diff_by_position.png")
    res, _ = bench_json(capsys, "--mode=context", f"--data_dir={facts}", f"--plot_dir={tmp_path}", "--context_windows=5")
    assert "diff" not in res["context"] and res["context"]["T"][0] == 16


def test_locality_mode(deep_stem, trained, tmp_path, capsys):
    res, text = bench_json(capsys, "--mode=locality", f"--ckpt={deep_stem}", "--device=cpu", f"--plot_dir={tmp_path}",
                           "--locality_pairs=12")
    loc = res["locality"]
    for k in ("fact_recall", "edit_success", "unchanged", "c_correct", "c_correct_edited", "control_unchanged",
              "control_identical_logits", "positive_changed_logits"):
        assert 0 <= loc[k] <= 1, k
    assert loc["pairs"] + loc["skipped"] == 12 and loc["control_pairs"] > 0 and loc["positive_pairs"] > 0
    assert loc["control_unchanged"] == 1.0 and loc["control_identical_logits"] == 1.0  # exactly: rows never read
    assert loc["positive_changed_logits"] == 1.0  # the same swap on a token of the prompt does change the logits
    assert os.path.isfile(tmp_path / "locality.png") and "by construction" not in text
    out, _ = trained  # 2 layers, the table in the last: an edit cannot reach another position
    res, text = bench_json(capsys, "--mode=locality", f"--ckpt={out}", "--device=cpu", f"--plot_dir={tmp_path}",
                           "--locality_pairs=5")
    assert res["locality"]["unchanged"] == 1.0 and "by construction" in text


def test_claim_modes_bad_arguments(trained, swiglu_run, tmp_path):
    out, _ = trained
    assert_user_error(run("bench.py", "--mode=spread", ok=False), "needs --ckpt")
    for args, needle in ((["--mode=spread", f"--ckpt={out}", "--spread_pool=max"], "spread_pool"),
                         (["--mode=spread", f"--ckpt={out}", "--spread_ids=1"], "at least 2"),
                         (["--mode=spread", f"--ckpt={out}", "--spread_layer=0"], "not a table layer"),
                         (["--mode=spread", f"--ckpt={swiglu_run}"], "no table layers"),
                         (["--mode=spread", f"--ckpt={tmp_path}/none"], "no checkpoint there"),
                         (["--mode=locality", f"--ckpt={swiglu_run}"], "no table layers"),
                         (["--mode=context", f"--ckpt={out}"], "give both"),
                         (["--mode=context", f"--ckpt={swiglu_run}", f"--ckpt_swiglu={out}"], "swapped"),
                         (["--mode=context", f"--ckpt={out}", f"--ckpt_swiglu={out}"], "swapped"),
                         (["--mode=stability", "--stability_lrs=1,-3"], "stability_lrs"),
                         (["--mode=stability", "--stability_seeds=a"], "stability_seeds"),
                         (["--mode=stability", "--spike_margin=0"], "spike_margin"),
                         (["--mode=stability", f"--train_preset={tmp_path}/none.py"], "no such preset"),
                         (["--mode=context", "--context_max=16"], "context_max")):
        with pytest.raises(UserError, match=needle):
            bench.main(args + ["--device=cpu", f"--plot_dir={tmp_path}"])

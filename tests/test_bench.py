"""bench.py: argument handling and the shape of its JSON line (timings are never asserted)."""
import json
import os

import pytest
import torch

from conftest import TINY, _train_inproc, assert_user_error, run  # noqa: F401

SMALL = ["--device=cpu", "--burn_in=0", "--steps=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=64",
         "--block_size=32", "--batch_size=4"]


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_ffn_mode_json_shape():
    p = run("bench.py", "--mode=ffn", "--device=cpu", "--shapes=16x32x64,32x64x32", "--burn_in=0", "--steps=1",
            "--table_vocab=100")
    assert p.stdout.startswith("# nanoSTEM bench --mode ffn")
    res = last_json(p)
    assert res["mode"] == "ffn" and len(res["ffn"]) == 2
    r = res["ffn"][1]
    assert (r["n_embd"], r["ffn_hidden"], r["tokens"]) == (32, 64, 32)
    assert abs(r["lazy_ratio"] - r["stem_lazy_ms"] / r["swiglu_ms"]) < 1e-9 and r["flop_ratio"] == 2 / 3
    assert abs(r["dense_ratio"] - r["stem_dense_ms"] / r["swiglu_ms"]) < 1e-9
    assert abs(r["floor_ratio"] - r["floor_ms"] / r["swiglu_ms"]) < 1e-9


def test_train_mode_one_variant_and_nothing_to_run(facts):
    res = last_json(run("bench.py", "--mode=train", f"--data_dir={facts}", "--variants=swiglu", *SMALL))
    assert [r["variant"] for r in res["train"]] == ["swiglu"] and res["train"][0]["vs_swiglu"] == 1.0
    assert_user_error(run("bench.py", "--mode=train", f"--data_dir={facts}", "--ffn=swiglu", "--variants=stem-lazy",
                          *SMALL, ok=False), "nothing to run")


def test_train_mode_runs_every_variant(facts):
    res = last_json(run("bench.py", "--mode", "train", f"--data_dir={facts}", "--peak_flops=1e12", "--repeats", "3",
                        *SMALL, "--steps=3", "--turn=2"))
    names = [r["variant"] for r in res["train"]]
    assert names == ["swiglu", "stem-dense", "stem-lazy", "stem-offload"]
    for r in res["train"]:
        runs = r["step_s_runs"]
        assert len(runs) == 3 and abs(r["step_ms"] - sorted(runs)[1] * 1e3) < 1e-9  # the median child
        assert r["peak_mem_mib"] > 0
        assert abs(r["tok_per_s"] * r["step_ms"] / 1e3 - 4 * 32) < 1e-6
        assert abs(r["mfu"] - r["train_flops_per_token"] * r["tok_per_s"] / 1e12) < 1e-12
    lazy, off = res["train"][2], res["train"][3]
    # the ratio is the median of the per-child ratios (side by side), not the ratio of the medians
    per_child = sorted(a / b for a, b in zip(lazy["step_s_runs"], off["step_s_runs"]))
    assert off["vs_stem_lazy"] == per_child[1]
    assert res["train"][0]["train_flops_per_token"] > res["train"][1]["train_flops_per_token"]  # STEM: fewer


def test_timed_turns_counts_every_step_and_drains_each_turn(monkeypatch):
    import bench
    clock, calls, drained = [0.0], [], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    # seconds each call takes on a fake clock, by call number: burn-in and refill steps cost 100 (never
    # timed); a's timed steps 2 and 4 (turn 1), 1 and 1 (turn 2), 8 (turn 3); b's always 2
    cost = {4: 2, 5: 4, 10: 1, 11: 1, 16: 8, 7: 2, 8: 2, 13: 2, 14: 2, 18: 2}

    def step(k):
        calls.append(k)
        clock[0] += cost.get(len(calls), 100)
    fns = {k: (lambda k=k: step(k)) for k in "ab"}
    drains = {k: (lambda k=k: drained.append((k, len(calls)))) for k in "ab"}
    dt = bench.timed_turns(fns, drains, "cpu", burn_in=1, steps=5, turn=2)
    # burn-in a, b; then turns of 2, 2, 1 timed steps, each after one untimed refill step, a before b
    assert "".join(calls) == "a" + "b" + "aaabbb" + "aaabbb" + "aabb"
    assert drained == [("a", 1), ("b", 2), ("a", 5), ("b", 8), ("a", 11), ("b", 14), ("a", 16), ("b", 18)]
    assert dt == {"a": 3.0, "b": 2.0}  # a: the median of the turns' means 3, 1, 8 (not their mean, 4)


def test_offload_and_decode_modes_on_cpu(facts, tmp_path):
    p = run("bench.py", "--mode=offload", f"--data_dir={facts}", "--shape=model", *SMALL)
    assert "PREDICTED" in p.stdout and "predicted, not measured" in p.stdout
    res = last_json(p)
    assert res["ids"]["tokens_per_step"] == 4 * 32 and 0 < res["ids"]["unique"] <= 128 and 0 <= res["ids"]["shared"] <= 1
    assert res["ids"]["used_unique"] == res["ids"]["unique"]  # the data's vocabulary fits the shape: measured K
    for k in ("gather_gbps", "host_update_gbps", "fused_floor_gbps", "scatter_gbps"):
        assert res[k] > 0
    assert res["host_update_vs_floor"] == res["host_update_gbps"] / res["fused_floor_gbps"]
    pred = res["predicted"][0]
    assert pred["n_stem"] == 1 and pred["row_floats"] == 64 and pred["tokens_per_step"] == 4 * 32
    assert abs(pred["gpu_step_ms"] - pred["train_flops_per_token"] * 128 / (0.5 * pred["peak_flops"]) * 1e3) < 1e-9
    assert 0 < res["predicted_ratio"] <= 1 and "measured" not in res
    res = last_json(run("bench.py", "--mode=decode", f"--data_dir={facts}", "--cache_sizes=4,64", "--decode_tokens=5",
                        f"--plot_dir={tmp_path}", *SMALL))
    assert [r["variant"] for r in res["decode"]] == ["resident", "offload", "offload"]
    assert [r["cache_rows"] for r in res["decode"]] == [0, 4, 64]
    assert 0 <= res["decode"][1]["hit_rate"] <= res["decode"][2]["hit_rate"] <= 1
    assert os.path.isfile(tmp_path / "decode_hit_rate.png")


def test_quality_mode_summarises_runs(facts, tmp_path):
    runs = tmp_path / "runs"
    for name, a in (("facts-swiglu-s1", "--ffn=swiglu"), ("facts-swiglu-s2", "--ffn=swiglu"), ("facts-stem-all-s1", "--ffn=stem")):
        _train_inproc(f"--data_dir={facts}", f"--out_dir={runs / name}", "--max_iters=2", "--eval_interval=1",
                      a, f"--seed={name[-1]}", *TINY)
    (runs / "facts-stem-all-s2").mkdir()  # a run interrupted before its first checkpoint
    (runs / "facts-stem-all-s2" / "metrics.jsonl").write_text("")
    p = run("bench.py", "--mode=quality", f"--runs={runs}", f"--plot_dir={tmp_path}")
    assert "# skipping facts-stem-all-s2: unfinished (no checkpoint yet)" in p.stdout
    res = last_json(p)
    q = {(r["dataset"], r["arch"]): r for r in res["quality"]}
    assert set(q) == {("facts", "swiglu"), ("facts", "stem-all")}
    assert q[("facts", "swiglu")]["seeds"] == 2 and q[("facts", "stem-all")]["seeds"] == 1
    assert q[("facts", "stem-all")]["params_tables"] > 0 == q[("facts", "swiglu")]["params_tables"]
    assert q[("facts", "swiglu")]["steps"] == 2 and 0 <= q[("facts", "swiglu")]["recall_mean"] <= 1
    assert q[("facts", "swiglu")]["edit_success_mean"] is None and 0 <= q[("facts", "stem-all")]["edit_success_mean"] <= 1
    for name in ("val_vs_tokens", "val_vs_flops", "recall_vs_tokens"):
        assert os.path.isfile(tmp_path / f"quality_facts_{name}.png")


def test_bench_bad_arguments(tmp_path):
    assert_user_error(run("bench.py", "--mode=fast", ok=False), "mode='fast' is not one of")
    assert_user_error(run("bench.py", "--steps=many", ok=False), "--steps=many is not a valid int")
    assert_user_error(run("bench.py", "--mode=quality", f"--runs={tmp_path}/none", ok=False), "quality.sh")
    assert_user_error(run("bench.py", "--mode=train", "--device=cpu", f"--data_dir={tmp_path}/none", ok=False),
                      "no prepared data")
    assert_user_error(run("bench.py", "--mode=ffn", "--shapes=12x", ok=False), "shapes")


def test_step_model_against_hand_arithmetic():
    import bench
    shape = dict(n_layer=3, n_head=2, n_embd=64, ffn_hidden=128, vocab_size=1000, block_size=32, stem_layers="1,2",
                 batch_size=4)
    rates = dict(gather_gbps=8.0, host_update_gbps=2.0, scatter_gbps=4.0)
    K, s, link, host, mfu, peak = 100, 0.4, 10.0, 20.0, 0.5, 1e12
    pred, pred_here, inputs = bench.step_model(shape, K, s, rates, link, host, mfu, peak)
    W, tokens = 2 * 128, 4 * 32
    # forward FLOPs per token by hand: 2 per matmul weight (attention 4 d^2 per layer, FFN 3 d h for
    # SwiGLU layers and 2 d h for STEM layers, the head V d) plus attention scores 4 L T d
    d, h, L, T, V = 64, 128, 3, 32, 1000
    fwd = 2 * (L * 4 * d * d + (3 * d * h) + 2 * (2 * d * h) + V * d) + 4 * L * T * d
    t_gpu = 3 * fwd * tokens / (mfu * peak)
    new, upd, wb, mv = K * 0.6, K * 0.36, K * 0.4 * 0.6, K * 0.6 * 0.4
    t_here = ((new + 2 * mv) * W * 4 / 8e9 + upd * W * 4 / 2e9 + 3 * wb * W * 4 / 4e9)
    t_server = (8 * (new + 2 * mv) * W + 28 * upd * W + 8 * 3 * wb * W) / 20e9
    t_h2d, t_d2h = (new + 2 * mv) * W * 4 / 10e9, (upd + 3 * wb) * W * 4 / 10e9
    t_dev = 28 * (K - upd) * W / 4.8e12 * 3
    assert abs(inputs["gpu_step_ms"] - t_gpu * 1e3) < 1e-9
    assert abs(pred - t_gpu / max(t_gpu + t_dev, t_server, t_h2d, t_d2h)) < 1e-12
    assert abs(pred_here - t_gpu / max(t_gpu + t_dev, t_here, t_h2d, t_d2h)) < 1e-12


def test_plot_without_matplotlib_says_so_and_draws_nothing(monkeypatch, tmp_path, capsys):
    # a GPU machine may have torch and nothing else: bench's figures are in its table and JSON line
    import builtins
    import bench
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "figs" / "x.png"
    bench.plot(str(path), "x", "y", {"a": [(1, 2), (2, 3)]})
    assert "matplotlib is not installed" in capsys.readouterr().out and not path.exists()
    monkeypatch.setattr(builtins, "__import__", real_import)
    bench.plot(str(path), "x", "y", {"a": [(1, 2), (2, 3)]})
    assert path.exists()  # and with it, the figure is drawn


def _gpu_check(tmp_path, python):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON=python or sys.executable, REPORT=str(tmp_path / "report.txt"))
    return subprocess.run(["bash", os.path.join(root, "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_without_cuda_or_numpy_in_one_line(tmp_path):
    p = _gpu_check(tmp_path, None)  # this Python: torch without CUDA
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "needs a CUDA GPU" in p.stderr
    # a Python whose torch sees a GPU but that has no numpy (a stand-in answering the two probes)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in *numpy*) exit 1;; *) exit 0;; esac\n')
    fake.chmod(0o755)
    p = _gpu_check(tmp_path, str(fake))
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "needs numpy" in p.stderr
    assert not (tmp_path / "report.txt").exists()  # nothing written before the checks pass

"""bench.py: argument handling, the arithmetic behind its figures and the shape of its JSON line (timings
are never asserted). The modes run in-process; train mode's children and the error line are subprocesses."""
import json
import os
import re
import subprocess
from contextlib import nullcontext
from dataclasses import asdict

import pytest
import torch

from conftest import ROOT, assert_user_error, run

import bench
import offload
from configurator import UserError, read_preset
from model import GPT, GPTConfig

SMALL = ["--device=cpu", "--burn_in=0", "--steps=1", "--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=64",
         "--block_size=32", "--batch_size=4"]


def bench_json(capsys, *args):
    capsys.readouterr()
    bench.main(list(args))
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_ffn_mode_json_shape(capsys):
    res, out = bench_json(capsys, "--mode=ffn", "--device=cpu", "--shapes=16x32x64,32x64x32", "--burn_in=0",
                          "--steps=1", "--table_vocab=100")
    assert out.startswith("# nanoSTEM bench --mode ffn")
    assert res["mode"] == "ffn" and len(res["ffn"]) == 2
    r = res["ffn"][1]
    assert (r["n_embd"], r["ffn_hidden"], r["tokens"]) == (32, 64, 32)
    assert abs(r["lazy_ratio"] - r["stem_lazy_ms"] / r["swiglu_ms"]) < 1e-9 and r["flop_ratio"] == 2 / 3
    assert abs(r["dense_ratio"] - r["stem_dense_ms"] / r["swiglu_ms"]) < 1e-9
    assert abs(r["floor_ratio"] - r["floor_ms"] / r["swiglu_ms"]) < 1e-9


def test_train_mode_in_child_processes(facts, capsys):
    # the real protocol: one speed child timing both variants in turns, one memory child per variant
    res, out = bench_json(capsys, "--mode", "train", f"--data_dir={facts}", "--variants=swiglu,stem-offload",
                          "--peak_flops=1e12", "--grad_accum=2", *SMALL, "--steps=2", "--turn=1")
    assert [r["variant"] for r in res["train"]] == ["swiglu", "stem-offload"]
    assert res["grad_accum"] == 2 and res["compile"] is False and "CPU: compile time outweighs" in out
    assert res["peak_flops"] == 1e12 and res["peak_flops_source"] == "--peak_flops"
    for r in res["train"]:
        assert len(r["step_s_runs"]) == 1 and r["peak_mem_mib"] > 0
        assert abs(r["tok_per_s"] * r["step_ms"] / 1e3 - 2 * 4 * 32) < 1e-6  # grad_accum x batch x block tokens
        assert abs(r["mfu"] - r["train_flops_per_token"] * r["tok_per_s"] / 1e12) < 1e-12
    assert res["train"][0]["vs_swiglu"] == 1.0 and res["train"][1]["vs_stem_lazy"] is None
    assert res["train"][0]["train_flops_per_token"] > res["train"][1]["train_flops_per_token"]  # STEM: fewer
    with pytest.raises(UserError, match="nothing to run"):
        bench.main(["--mode=train", f"--data_dir={facts}", "--ffn=swiglu", "--variants=stem-lazy", *SMALL])
    with pytest.raises(UserError, match="'stem-fast' not one of"):
        bench.main(["--mode=train", f"--data_dir={facts}", "--variants=swiglu,stem-fast", *SMALL])


def test_trainer_steps_as_train_py_in_its_order(facts, monkeypatch):
    bc = bench.BenchConfig(data_dir=facts, batch_size=4, grad_accum=3)
    mc = GPTConfig(n_layer=2, n_head=2, n_embd=32, ffn_hidden=64, block_size=32, vocab_size=8)
    step, sync, flops = bench.trainer("stem-lazy", bc, mc, "cpu", nullcontext())
    events, forwards = [], []

    def log(obj, name, event):  # obj.name, recording event before each call
        real = getattr(obj, name)
        monkeypatch.setattr(obj, name, lambda *a, **k: events.append(event) or real(*a, **k))
    for obj, name, event in ((bench.Batches, "get", "draw"), (torch.Tensor, "backward", "bwd"),
                             (bench.ResidentTables, "step", "tables"), (torch.nn.utils, "clip_grad_norm_", "clip"),
                             (torch.optim.AdamW, "step", "adamw")):
        log(obj, name, event)
    real_forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, x, *a, **k: forwards.append(x.shape) or events.append("fwd")
                        or real_forward(self, x, *a, **k))
    step()
    sync()
    # train.py's loop: the next step's 3 micro-batches drawn after micro-batch 0's backward; the tables' clip and
    # update before the backbone's
    assert events == ["fwd", "bwd", "draw", "draw", "draw", "fwd", "bwd", "fwd", "bwd", "tables", "clip", "adamw"]
    assert forwards == [(4, 32)] * 3 and flops > 0


def test_run_variants_takes_medians_of_the_children(monkeypatch):
    # stand-in children: the speed children report these step times in turn, the memory children a peak per variant
    speed = iter([{"swiglu": 1.0, "stem-lazy": 4.0}, {"swiglu": 2.0, "stem-lazy": 2.0},
                  {"swiglu": 6.0, "stem-lazy": 3.0}])
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        role, variant = cmd[-2].split("=")[1], cmd[-1].split("=")[1]
        out = ({v: dict(step_s=t, train_flops_per_token=7.0) for v, t in next(speed).items()} if role == "speed"
               else dict(peak_mem_mib={"swiglu": 10.0, "stem-lazy": 20.0}[variant]))
        return subprocess.CompletedProcess(cmd, 0, "# a header\n" + json.dumps(out) + "\n", "")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    a, b = bench.run_variants(["--steps=3", "--mode=offload"], ["swiglu", "stem-lazy"], 3, tokens=100, peak=1e3)
    # a child gets the parent's arguments, then its own keys (the later --mode wins)
    assert calls[0][2:] == ["--steps=3", "--mode=offload", "--mode=train", "--child=speed",
                            "--variants=swiglu,stem-lazy"]
    assert [c[-1] for c in calls[3:]] == ["--variants=swiglu", "--variants=stem-lazy"]  # memory: each variant alone
    assert a["step_s_runs"] == [1.0, 2.0, 6.0] and a["step_ms"] == 2000.0 and a["tok_per_s"] == 50.0
    assert b["step_ms"] == 3000.0 and (a["peak_mem_mib"], b["peak_mem_mib"]) == (10.0, 20.0)
    assert a["mfu"] == 7.0 * 50.0 / 1e3 and a["vs_swiglu"] == 1.0 and b["vs_stem_lazy"] == 1.0
    # stem-lazy against swiglu: the median of the per-child ratios 1/4, 2/2, 6/3 is 1.0 (not the ratio of the
    # medians, 2/3); swiglu against stem-lazy: the median of 4, 1, 0.5
    assert b["vs_swiglu_runs"] == [0.25, 1.0, 2.0] and a["vs_stem_lazy_runs"] == [4.0, 1.0, 0.5]
    assert b["vs_swiglu"] == 1.0 and a["vs_stem_lazy"] == 1.0
    speed = iter([{"swiglu": 1.0, "stem-lazy": 4.0}])
    a, b = bench.run_variants([], ["swiglu", "stem-lazy"], 1, tokens=100, peak=None)
    assert (b["vs_swiglu"], a["vs_stem_lazy"], a["mfu"]) == (0.25, 4.0, None)
    monkeypatch.setattr(bench.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "error: boom\n"))
    with pytest.raises(UserError, match="variant swiglu failed: error: boom"):
        bench.run_variants([], ["swiglu"], 1, tokens=100, peak=None)


def test_timed_in_turns_counts_every_step_and_drains_each_turn(monkeypatch):
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
    dt = bench.timed(fns, "cpu", burn_in=1, steps=5, turn=2, drains=drains)
    # burn-in a, b; then turns of 2, 2, 1 timed steps, each after one untimed refill step, a before b
    assert "".join(calls) == "a" + "b" + "aaabbb" + "aaabbb" + "aabb"
    assert drained == [("a", 1), ("b", 2), ("a", 5), ("b", 8), ("a", 11), ("b", 14), ("a", 16), ("b", 18)]
    assert dt == {"a": 3.0, "b": 2.0}  # a: the median of the turns' means 3, 1, 8 (not their mean, 4)


def test_peak_flops_by_gpu_variant(monkeypatch):
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA A100-SXM4-80GB": "A100",
             "NVIDIA A100 80GB PCIe": "A100", "NVIDIA L4": "L4", "NVIDIA GeForce RTX 4090": "RTX 4090",
             "NVIDIA L40S": None, "NVIDIA GH200 480GB": None, "NVIDIA GeForce RTX 3090": None, "Tesla T4": None}
    peaks = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
             "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}
    asked, bc = [], bench.BenchConfig()
    for name, variant in names.items():
        monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda d, name=name: asked.append(d) or name)
        peak, source = bench.peak_flops(bc, "cuda:1")
        assert peak == peaks.get(variant) and name in source, (name, peak, source)
        assert f"{variant} bf16 dense" in source if variant else "--peak_flops" in source  # unknown: why, and the fix
    assert set(asked) == {"cuda:1"}  # the device asked for, not the current one
    assert bench.peak_flops(bench.BenchConfig(peak_flops=5e14), "cuda") == (5e14, "--peak_flops")
    assert bench.peak_flops(bc, "cpu")[0] is None


def test_cuda_calls_name_their_device(monkeypatch):
    # --device=cuda:1: synchronize and the peak-memory statistics must ask cuda:1, not the current device
    seen = []
    for fn in ("synchronize", "max_memory_allocated"):
        monkeypatch.setattr(bench.torch.cuda, fn, lambda d=None, fn=fn: seen.append((fn, d)) or 2**20)
    bench.timed({"a": lambda: None}, "cuda:1", burn_in=0, steps=1)
    steps = []
    monkeypatch.setattr(bench, "trainer", lambda *a: (lambda: steps.append(1), lambda: None, 1.0))
    bc = bench.BenchConfig(child="memory", variants="swiglu", burn_in=0)
    assert bench.train_child(bc, None, "cuda:1", None) == dict(peak_mem_mib=1.0) and len(steps) == 2
    assert seen == [("synchronize", "cuda:1")] * 2 + [("max_memory_allocated", "cuda:1")]


def test_offload_and_decode_modes_on_cpu(facts, tmp_path, capsys):
    res, out = bench_json(capsys, "--mode=offload", f"--data_dir={facts}", "--shape=model", "--grad_accum=3", *SMALL)
    assert "PREDICTED, not measured (gpu_check.sh runs the real run)" in out
    ids = res["ids"]  # the data's vocabulary fits the shape: K, k, s measured
    assert 0 < ids["unique_micro"] <= ids["unique_step"] <= 3 * 4 * 32 and 0 <= ids["shared"] <= 1
    assert (ids["used_K"], ids["used_k"], ids["used_shared"]) == (ids["unique_step"], ids["unique_micro"],
                                                                 ids["shared"])
    for k in ("gather", "grad_add", "norm", "host_update", "fused_floor"):
        assert res[f"{k}_gbps"] > 0
    assert res["host_update_vs_floor"] == res["host_update_gbps"] / res["fused_floor_gbps"]
    cfg = GPTConfig(**{k: res["shape"][k] for k in GPTConfig.__dataclass_fields__})  # the data's vocabulary
    assert (res["shape"]["batch_size"], res["shape"]["grad_accum"], cfg.n_layer, cfg.ffn_hidden) == (4, 3, 2, 64)
    k, K = round(ids["unique_micro"]), round(ids["unique_step"])
    assert res["device_bytes"] == offload.device_bytes(cfg, 4, grad_accum=3, unique_per_micro=k, unique_per_step=K)
    pred = res["predicted"][0]
    assert pred["n_stem"] == 1 and pred["row_floats"] == 64 and pred["tokens_per_step"] == 3 * 4 * 32
    assert pred["peak_flops"] == bench.PEAK_FLOPS["H200"] and res["peak_flops"] is None  # CPU: an H200 is modelled
    assert abs(pred["gpu_step_ms"] - pred["train_flops_per_token"] * 384 / (0.5 * pred["peak_flops"]) * 1e3) < 1e-9
    assert 0 < res["predicted_ratio"] <= 1 and "measured" not in res
    res, _ = bench_json(capsys, "--mode=decode", f"--data_dir={facts}", "--cache_sizes=4,64", "--decode_tokens=5",
                        f"--plot_dir={tmp_path}", *SMALL)
    assert [r["variant"] for r in res["decode"]] == ["resident", "offload", "offload"]
    assert [r["cache_rows"] for r in res["decode"]] == [0, 4, 64]
    assert 0 <= res["decode"][1]["hit_rate"] <= res["decode"][2]["hit_rate"] <= 1
    assert os.path.isfile(tmp_path / "decode_hit_rate.png")


def test_offload_default_is_the_gpt2_small_preset_with_its_device_bytes(facts, capsys, monkeypatch):
    # the default shape and batch are the preset's; the host rates are stubbed (large tables: bench.py measures them)
    monkeypatch.setattr(bench, "host_rates", lambda V, W, h, K, k, steps: (dict.fromkeys(
        ("gather_gbps", "grad_add_gbps", "norm_gbps", "host_update_gbps", "fused_floor_gbps"), 1.0), 2))
    res, out = bench_json(capsys, "--mode=offload", f"--data_dir={facts}", "--device=cpu", "--steps=1")
    preset = dict(read_preset(os.path.join(ROOT, "presets", "gpt2_small_stem.py")))
    cfg = GPTConfig(vocab_size=50257, **{k: v for k, v in preset.items() if k in GPTConfig.__dataclass_fields__})
    assert res["shape"] == dict(asdict(cfg), batch_size=16, grad_accum=32) == dict(
        res["shape"], batch_size=preset["batch_size"], grad_accum=preset["grad_accum"])
    # facts' vocabulary is not GPT-2's: K and k are the web-text estimate
    assert res["ids"]["source"].startswith("the web-text estimate") and res["ids"]["used_K"] == 30_000
    want = offload.device_bytes(cfg, 16, grad_accum=32, unique_per_micro=5_000, unique_per_step=30_000)
    assert res["device_bytes"] == want and set(want) == {"resident_lazy", "offload"}
    assert f"({want['offload'] / want['resident_lazy']:.1%})" in out and "(offload / resident)" in out


def test_offload_measured_run_takes_gpu_checks_shorter_step(facts, capsys, monkeypatch):
    # gpu_check.sh shortens offload's measured run with these flags: its children must get them, and the prediction
    # stay at the preset's 32 micro-batches. A stand-in CUDA: small CPU buffers for the copy rates, no-op syncs.
    script = open(os.path.join(ROOT, "gpu_check.sh")).read()
    flags = re.search(r'bench.py --mode offload --data_dir="\$data" (.*?) \\\n', script)[1].split()
    assert {f.split("=")[0] for f in flags} == {"--grad_accum", "--steps", "--burn_in", "--repeats"}
    monkeypatch.setattr(bench, "host_rates", lambda V, W, h, K, k, steps: (dict.fromkeys(
        ("gather_gbps", "grad_add_gbps", "norm_gbps", "host_update_gbps", "fused_floor_gbps"), 1.0), 2))
    real_empty, calls = torch.empty, []
    monkeypatch.setattr(bench.torch, "empty", lambda *a, pin_memory=False, **k: (
        real_empty(4) if pin_memory or k.get("device") == "cuda" else real_empty(*a, **k)))
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda d=None: None)

    def fake_run_variants(argv, variants, repeats, tokens, peak):
        calls.append((argv, variants, repeats, tokens))
        return [dict(vs_stem_lazy=1.0 if v == "stem-lazy" else 0.9, tok_per_s=100.0, mfu=0.4, peak_mem_mib=m)
                for v, m in zip(variants, (900.0, 500.0))]
    monkeypatch.setattr(bench, "run_variants", fake_run_variants)
    argv = ["--mode=offload", f"--data_dir={facts}", "--peak_flops=1e15", *flags]
    bc, mc = bench.BenchConfig(), GPTConfig()
    keys = bench.parse_config(argv, bc, mc)
    res = bench.bench_offload(bc, mc, "cuda", argv, keys)
    [(child_argv, variants, repeats, tokens)] = calls
    child = bench.BenchConfig()  # what a child makes of its arguments (the later key wins)
    bench.parse_config(child_argv + ["--mode=train", "--child=speed", f"--variants={','.join(variants)}"], child,
                       GPTConfig())
    want = dict(f[2:].split("=") for f in flags)
    assert {k: str(getattr(child, k)) for k in want} == want and repeats == int(want["repeats"])
    assert variants == ["stem-lazy", "stem-offload"] and (child.batch_size, child.mode) == (16, "train")
    assert tokens == int(want["grad_accum"]) * 16 * 1024 and res["measured"]["grad_accum"] == int(want["grad_accum"])
    assert res["measured"]["ratio"] == 0.9 and res["measured"]["gpu_mem_saved_mib"] == 400.0
    assert res["shape"]["grad_accum"] == 32 and {p["grad_accum"] for p in res["predicted"]} == {32}
    assert res["h2d_gbps"] > 0 and "MEASURED offloaded/resident-lazy tok/s (grad_accum 4)" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--mode=decode", "--ffn=swiglu"], ["--mode=decode", "--block_size=2"],
                                  ["--mode=offload", "--shape=model", "--ffn=swiglu"],
                                  ["--mode=train", "--ffn=swiglu", "--variants=stem-lazy"], ["--child=fast"],
                                  ["--mode=decode", "--ckpt=nope"]])
def test_refusals_come_before_the_default_data_is_made(args):
    with pytest.raises(UserError):
        bench.main(["--device=cpu", *args])
    assert os.listdir(".") == []  # the default data/facts was not prepared (cwd: the test's own empty folder)


def test_bench_bad_arguments(tmp_path):
    assert_user_error(run("bench.py", "--mode=quality", ok=False), "mode='quality' is not one of", "claims.py")
    for args, needle in ((["--mode=fast"], "mode='fast' is not one of"), (["--steps=many"], "--steps=many is not"),
                         (["--mode=train", f"--data_dir={tmp_path}/none"], "no prepared data"),
                         (["--mode=ffn", "--shapes=12x"], "shapes"), (["--grad_accum=0"], "grad_accum=0"),
                         (["--mode=offload", "--shape=gpt3"], "shape='gpt3' is not one of"),
                         (["--child=fast"], "child='fast' is internal"),
                         (["--mode=decode", f"--ckpt={tmp_path}"], r"no checkpoint at .* \(a ckpt.pt or its folder\)")):
        with pytest.raises(UserError, match=needle):
            bench.main(["--device=cpu", *args])


def test_step_model_against_hand_arithmetic():
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=64, ffn_hidden=128, vocab_size=1000, block_size=32, stem_layers="1,2")
    B, A, K, k, s, host, mfu = 4, 3, 100, 50, 0.4, 20.0, 0.5
    W, tokens, k0 = 2 * 128, 4 * 32 * 3, 20
    # forward FLOPs per token by hand: 2 per matmul weight (attention 4 d^2 per layer, FFN 3 d h for
    # SwiGLU layers and 2 d h for STEM layers, the head V d) plus attention scores 4 L T d
    d, h, L, T, V = 64, 128, 3, 32, 1000
    fwd = 2 * (L * 4 * d * d + (3 * d * h) + 2 * (2 * d * h) + V * d) + 4 * L * T * d
    won = set()
    for peak, link in ((1e12, 10.0), (1e14, 10.0), (1e16, 0.05)):  # the GPU, the host, the copies take longest
        t_gpu = 3 * fwd * tokens / (mfu * peak)
        one_way = k * W * 4 / (link * 1e9)
        gap = 2 * one_way + (12 * k + 4 * K + 28 * k0 + 8 * k) * W / 20e9  # BYTES at 20 GB/s
        host_work = (28 * (K - k0) + 2 * (8 + 12) * k) * W / 20e9  # A - 1 = 2 other micro-batches
        copies = 2 * one_way
        pred, inputs = bench.step_model(cfg, B, A, K, k, s, link, host, mfu, peak)
        assert abs(pred - t_gpu / (gap + max(t_gpu, host_work, copies))) < 1e-12
        assert abs(inputs["gpu_step_ms"] - t_gpu * 1e3) < 1e-9 and inputs["next_micro0_rows"] == k0
        assert abs(inputs["gap_ms"] - gap * 1e3) < 1e-9
        won.add(max((t_gpu, "gpu"), (host_work, "host"), (copies, "copies"))[1])
    assert won == {"gpu", "host", "copies"}


def test_plot_without_matplotlib_says_so_and_draws_nothing(monkeypatch, tmp_path, capsys):
    # a GPU machine may have torch and nothing else: bench's figures are in its table and JSON line
    import builtins
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

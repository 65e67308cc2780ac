"""The GPT-2-small presets for one GPU: they train a few steps at a reduced size, and at full size
their shape, batch and the printed estimates are what the README says (hand-computed here)."""
import os

import torch

from conftest import ROOT, run_inproc

SMALL = ["--n_layer=3", "--n_head=2", "--n_embd=32", "--ffn_hidden=64", "--block_size=32", "--batch_size=2",
         "--grad_accum=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=1"]


def test_gpt2_small_presets_train_at_a_reduced_size(facts, tmp_path):
    for ffn in ("stem", "swiglu"):  # the SwiGLU twin is the same preset with --ffn=swiglu
        out = tmp_path / ffn
        p = run_inproc("train.py", os.path.join(ROOT, "presets", "gpt2_small_stem.py"), f"--ffn={ffn}",
                       f"--data_dir={facts}", f"--out_dir={out}", *SMALL)
        assert "compute: 128 tokens per step, 256 in all" in p.stdout and "device memory, weights" in p.stdout
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["iter"] == 2 and ckpt["config"]["model"]["ffn"] == ffn
        assert ckpt["config"]["train"]["learning_rate"] == 6e-4 and os.path.exists(out / "best.pt")
        assert ("blocks.1.ffn.table" in ckpt["model"]) == (ffn == "stem")


def test_gpt2_small_stem_preset_at_full_size(capsys):
    from common import print_accounting
    from configurator import parse_config
    from model import GPT, GPTConfig
    from train import TrainConfig
    tc, mc = TrainConfig(), GPTConfig(vocab_size=50257)
    parse_config([os.path.join(ROOT, "presets", "gpt2_small_stem.py")], mc, tc)
    assert (mc.n_layer, mc.n_head, mc.n_embd, mc.ffn_hidden, mc.block_size) == (12, 12, 768, 2048, 1024)
    with torch.device("meta"):  # the shapes and counts, without 2 GB of weights
        model = GPT(mc)
    assert model.stem_layers == [1, 4, 7, 10]
    V, d, h, L, T = 50257, 768, 2048, 12, 1024
    tables = 4 * V * h
    active = 2 * V * d + L * (4 * d * d + 2 * d) + 8 * 3 * d * h + 4 * 2 * d * h + d  # embeddings, attn, norms, FFNs
    assert model.param_counts()["tables"] == tables and model.param_counts()["active"] == active
    tokens = 16 * 1024 * 32
    import offload
    print_accounting(model, tc=tc, tokens_per_step=tokens, table_bytes=offload.device_bytes(mc, 16, grad_accum=32))
    out = capsys.readouterr().out
    flops = 2 * (active - V * d - L * 2 * d - d) + 4 * L * T * d  # matmul weights (head included) + attention
    assert f"{tokens:,} tokens per step, {tokens * 5000:,} in all, {3 * flops * tokens * 5000:.3g} FLOPs" in out
    # lazy tables at most, by hand: every id distinct (K = V per step, k = 16,384 per micro-batch); W = 4 * h floats a
    # row. Resident: table, m, v (3V), the step's leaves and their gradients (2K), RowAdamW's gathered p, m, v block
    # of K + K // 4 + 16 rows. Offloaded: three micro-batches of leaves.
    W, block = 4 * h, V + V // 4 + 16
    resident, offloaded = 4 * W * (3 * V + 2 * V + 3 * block), 4 * W * 3 * 16 * 1024
    assert f"backbone {active * 16 / 1e9:.2f} GB, tables at most {resident / 1e9:.2f} GB resident " \
           f"(offloaded: {offloaded / 1e9:.2f} GB)" in out
    assert offloaded / resident < 0.25  # offload holds a few micro-batches' rows, resident whole tables and moments

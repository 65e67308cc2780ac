"""train.py and sample.py end to end on tiny configs: smoke runs, exact resume, DDP on gloo,
recall metric, editing from the command line, and every bad input giving one clear line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, _losses, _train_inproc, assert_user_error, run_inproc


def test_train_smoke_writes_checkpoint_metrics_plot(trained, facts):
    out, p = trained
    assert "parameters: embedding" in p.stdout and "FLOPs per token" in p.stdout
    assert "recall" in p.stdout and "step     6 | loss" in p.stdout and "tok/s" in p.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "config", "data", "iter", "tokens", "best_val_loss", "best_iter",
                         "last_val_loss", "rng"}
    meta = json.load(open(os.path.join(facts, "meta.json")))
    assert ckpt["data"]["fingerprint"] == meta["fingerprint"] and ckpt["tokens"] == 6 * 4 * 32
    assert ckpt["iter"] == 6 and ckpt["config"]["model"]["ffn"] == "stem"
    assert "blocks.1.ffn.table" in ckpt["model"] and not any(k.startswith("_orig_mod") for k in ckpt["model"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iter"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in rows if r["kind"] == "eval"] == [0, 3, 6]
    assert all(0 <= r["recall"] <= 1 for r in rows if r["kind"] == "eval")
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


def test_sample_smoke_and_edit(trained):
    out, _ = trained
    p = run_inproc("sample.py", f"--out_dir={out}", "--num_samples=2", "--max_new_tokens=8")
    assert p.stdout.count("---") == 2
    p = run_inproc("sample.py", f"--out_dir={out}", "--eval_facts")
    assert "fact recall" in p.stdout
    a, b = _two_names(out)
    for align in ("left_pad", "copy", "average"):
        p = run_inproc("sample.py", f"--out_dir={out}", f"--start=The capital of {a} is", "--greedy",
                       "--num_samples=1", "--max_new_tokens=3", "--edit", f"{a}={b}", f"--edit_align={align}")
        assert "=== without edit ===" in p.stdout and f"=== with edit {a}={b} ===" in p.stdout


def _two_names(out):
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    facts = json.load(open(os.path.join(ckpt["config"]["train"]["data_dir"], "facts.json")))
    return facts["entities"][0]["name"], facts["entities"][1]["name"]


@pytest.mark.parametrize("table_optimizer", ["dense", "lazy"])
def test_resume_is_exact(facts, tmp_path, table_optimizer):
    common = [f"--data_dir={facts}", "--eval_interval=3", "--lr_decay_iters=6", "--eval_facts=False",
              f"--table_optimizer={table_optimizer}", *TINY]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _train_inproc(f"--out_dir={a}", "--max_iters=6", *common)
    _train_inproc(f"--out_dir={b}", "--max_iters=4", *common)  # stops after 4 (checkpoint at 4)
    _train_inproc(f"--out_dir={b}", "--max_iters=6", "--init_from=resume", *common)
    assert _losses(a) == _losses(b) and len(_losses(a)) == 6
    sa = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ta, tb = sa["optimizer"]["tables"]["state"], sb["optimizer"]["tables"]["state"]
    for i in ta:
        assert torch.equal(ta[i]["exp_avg_sq"], tb[i]["exp_avg_sq"])


def test_resume_may_go_on_at_another_context(trained, tmp_path):
    """Positions carry no weights (RoPE): a run may continue at a longer block_size, and the model it goes on with
    computes, on a short sequence, what the model trained at the short context computes."""
    import shutil
    from common import load_checkpoint, model_from_checkpoint
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    before = load_checkpoint(os.path.join(out, "ckpt.pt"))
    p = run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=8", "--block_size=64")
    assert "going on at block_size 64, trained so far at 32" in p.stdout
    after = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert after["iter"] == 8 and after["config"]["model"]["block_size"] == 64
    assert after["tokens"] == before["tokens"] + 2 * 4 * 64  # the two new steps drew windows of 64 tokens
    assert after["best_iter"] > before["iter"]  # the best val loss is of the new context's, not the old's
    short, long = model_from_checkpoint(before).eval(), model_from_checkpoint(dict(before, config={
        **before["config"], "model": {**before["config"]["model"], "block_size": 64}})).eval()
    x = torch.randint(0, short.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        assert torch.equal(short(x[:, :32], x[:, :32])[0], long(x[:, :32], x[:, :32])[0])
        assert long(x, x)[0].shape[1] == 64
        with pytest.raises(AssertionError, match="block_size 32"):
            short(x, x)
    assert_user_error(run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--n_layer=3", ok=False),
                      "n_layer=2", "drop --n_layer")  # the weights' shapes still may not change


def _torchrun(cwd, *args):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_ddp_two_cpu_processes_gloo_and_exact_resume(facts, tmp_path):
    """Two gloo processes, lazy tables: the ranks agree; and 4 steps then a resume to 6 equal 6 steps
    straight (each rank continues its own data order: the checkpoint holds every rank's)."""
    common = [f"--data_dir={facts}", "--eval_interval=4", "--lr_decay_iters=6", "--table_optimizer=lazy",
              "--device=cpu", "--eval_facts=False", *TINY]
    out, straight = str(tmp_path / "ddp"), str(tmp_path / "straight")
    p = _torchrun(tmp_path, f"--out_dir={out}", "--max_iters=4", *common)
    assert "DDP over 2 processes" in p.stdout and "parameter checksums across ranks agree" in p.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter"] == 4 and len(ckpt["rng"]["data_ranks"]) == 2
    assert not torch.equal(*ckpt["rng"]["data_ranks"])  # the ranks draw different batches
    _torchrun(tmp_path, f"--out_dir={out}", "--init_from=resume", "--max_iters=6")
    _torchrun(tmp_path, f"--out_dir={straight}", "--max_iters=6", *common)
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (out, straight))
    assert a["iter"] == b["iter"] == 6
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ---- bad inputs: one line, exit 1, nothing overwritten ------------------------------------------

def test_bad_config_keys_and_values(facts):
    data = f"--data_dir={facts}"
    for script, args, needles in [
            ("train.py", ["--bogus=1"], ["unknown config key 'bogus'", "valid keys:", "max_iters"]),
            ("train.py", ["--max_iters=abc"], ["--max_iters=abc is not a valid int"]),
            ("train.py", ["--compile=maybe"], ["not a valid bool"]),
            ("train.py", [data, "--stem_layers=1,99"], ["stem_layers='1,99' is invalid"]),
            ("train.py", [data, "--table_optimizer=sgd"], ["table_optimizer"]),
            ("sample.py", ["--num_samples=two"], ["not a valid int"]),
            ("train.py", [data, "--init_from=pretrained"], ["init_from"]),
            ("train.py", [data, "--dtype=float16"], ["dtype='float16'"]),
            ("train.py", [data, "--vocab_size=10"], ["smaller than the data's"]),
            ("train.py", ["no_such_preset.py"], ["preset file no_such_preset.py not found"])]:
        assert_user_error(run_inproc(script, *args, ok=False), *needles)


def test_bad_edit_align_and_bench_checkpoint(trained, tmp_path):
    out, _ = trained
    assert_user_error(run_inproc("sample.py", f"--out_dir={out}", "--edit_align=middle", ok=False),
                      "edit_align='middle'")
    assert_user_error(run_inproc("bench.py", "--mode=decode", "--device=cpu", f"--ckpt={tmp_path}/none.pt", ok=False),
                      "no checkpoint at")


def test_preset_file(tmp_path, facts):
    import train
    from model import GPTConfig
    preset = tmp_path / "p.py"
    preset.write_text("n_layer = 3\nlearning_rate = 1  # an int where a float is expected is fine\n"
                      "lr_decay_iters = None\n")
    tc, mc = train.TrainConfig(), GPTConfig()
    keys = train.parse_config([str(preset), "--n_layer=5", "--lr_decay_iters=7"], mc, tc)
    assert (mc.n_layer, tc.learning_rate, tc.lr_decay_iters) == (5, 1.0, 7)
    assert keys == {"n_layer", "learning_rate", "lr_decay_iters"}
    preset.write_text("import os\n")
    assert_user_error(run_inproc("train.py", str(preset), ok=False), "only hold assignments")
    preset.write_text("n_layer = 'four'\n")
    assert_user_error(run_inproc("train.py", str(preset), ok=False), "n_layer = 'four' is not a int")


def test_missing_data_and_short_data(tmp_path):
    assert_user_error(run_inproc("train.py", f"--data_dir={tmp_path}/nope", ok=False), "no prepared data",
                      "prepare_data.py")
    import prepare_data
    short = str(tmp_path / "short")
    src = tmp_path / "s.txt"
    src.write_text("hello world, a short text. " * 20)
    prepare_data.prepare(dataset="text", input=str(src), out_dir=short, tokenizer="bpe:270", progress=False)
    assert_user_error(run_inproc("train.py", f"--data_dir={short}", "--block_size=4096", ok=False),
                      "tokens, not more than block_size", "lower --block_size")


def test_bad_checkpoints(trained, facts, tmp_path):
    out, _ = trained
    assert_user_error(run_inproc("sample.py", f"--out_dir={tmp_path}", ok=False), "no checkpoint at")
    bad = tmp_path / "trunc"
    bad.mkdir()
    data = open(os.path.join(out, "ckpt.pt"), "rb").read()
    (bad / "ckpt.pt").write_bytes(data[: len(data) // 2])
    assert_user_error(run_inproc("sample.py", f"--out_dir={bad}", ok=False), "unreadable")
    data_dir = f"--data_dir={facts}"  # the run's own
    assert_user_error(run_inproc("train.py", data_dir, f"--out_dir={bad}", "--init_from=resume", ok=False),
                      "unreadable")
    assert (bad / "ckpt.pt").read_bytes() == data[: len(data) // 2]  # not overwritten
    assert_user_error(run_inproc("train.py", data_dir, f"--out_dir={out}", "--init_from=resume", "--ffn=swiglu",
                                 ok=False), "ffn='stem'", "asks for ffn='swiglu'")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == data


def test_bad_sample_inputs(trained, facts, tmp_path):
    out, _ = trained
    a, b = _two_names(out)
    for args, needle in [(["--start=Hello there", "--edit", f"{a}={b}"], f"{a!r} does not occur in the prompt"),
                         ([f"--start={a}", "--edit", "nonsense"], "Source=Target"),
                         (["--start=FILE:/no/such/file"], "no such file")]:
        assert_user_error(run_inproc("sample.py", f"--out_dir={out}", *args, ok=False), needle)
    # a model trained on a small vocabulary, prompted through a larger tokenizer
    import prepare_data
    src = tmp_path / "t.txt"
    src.write_text("the quick brown fox jumps over the lazy dog; " * 300)
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    prepare_data.prepare(dataset="text", input=str(src), out_dir=small, tokenizer="bpe:260", progress=False)
    prepare_data.prepare(dataset="text", input=str(src), out_dir=large, tokenizer="bpe:400", progress=False)
    sw = str(tmp_path / "sw")
    _train_inproc(f"--data_dir={small}", f"--out_dir={sw}", "--max_iters=1", "--eval_interval=1", "--ffn=swiglu", *TINY)
    assert_user_error(run_inproc("sample.py", f"--out_dir={sw}", f"--data_dir={large}", "--start=the quick brown fox",
                                 ok=False), "tokenizer_sha256", "another folder, or prepared again")
    assert_user_error(run_inproc("sample.py", f"--out_dir={sw}", "--start=the fox", "--edit", "fox=dog", ok=False),
                      "needs STEM layers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_asked_for_without_cuda(facts):
    assert_user_error(run_inproc("train.py", f"--data_dir={facts}", "--device=cuda", ok=False),
                      "CUDA is not available", "--device=cpu")


def test_preset_list_keys(tmp_path):
    """A repeatable key in a preset: one string or a list of strings, added to those given on the command line."""
    import sample
    from configurator import UserError, parse_config
    cfg = sample.SampleConfig()
    preset = tmp_path / "s.py"
    preset.write_text('edit = ["A=B", "C=D"]\n')
    parse_config([str(preset), "--edit=E=F"], cfg)
    assert cfg.edit == ["A=B", "C=D", "E=F"]
    cfg = sample.SampleConfig()
    preset.write_text('edit = "A=B"\n')
    parse_config([str(preset)], cfg)
    assert cfg.edit == ["A=B"]
    preset.write_text("edit = 5\n")
    with pytest.raises(UserError, match="not a string or a list of strings"):
        parse_config([str(preset)], sample.SampleConfig())

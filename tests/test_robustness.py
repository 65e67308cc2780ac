"""Nothing lost, nothing silent (train.py and bench.py): each test is a row of the bad-input table in
the README. Bad input gets one `error:` line and exit code 1, and the files already there are unchanged."""
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, assert_user_error, run, run_inproc
from configurator import UserError


def snapshot(folder):
    """Every file's bytes, to show that a refused command changed nothing."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def train_main(capsys, *args):
    """train.main in-process (no interpreter start per case); returns (exit code, stdout, stderr)."""
    import train
    with pytest.raises(SystemExit) as e:
        train.main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ---- runs are never overwritten -------------------------------------------------------------------

def test_fresh_start_over_a_checkpoint_is_refused(trained, facts):
    out, _ = trained
    before = snapshot(out)
    p = run_inproc("train.py", f"--data_dir={facts}", f"--out_dir={out}", *TINY, ok=False)
    assert_user_error(p, "ckpt.pt exists", "--init_from=resume", "another --out_dir")
    assert snapshot(out) == before


def test_mistakes_are_reported_before_the_checkpoint_in_the_way(trained, facts, tmp_path):
    """Over a run's folder, a missing data folder, a bad value or a device that is not there is what the
    user hears about first (fixing the out_dir alone would not get the run going)."""
    out, _ = trained
    before = snapshot(out)
    cases = [([f"--data_dir={tmp_path}/nope"], "no prepared data"),
             ([f"--data_dir={facts}", "--batch_size=0"], "batch_size=0"),
             ([f"--data_dir={facts}", "--vocab_size=10"], "smaller than the data's")]
    if not torch.cuda.is_available():
        cases.append(([f"--data_dir={facts}", "--device=cuda"], "CUDA is not available"))
    for args, needle in cases:
        assert_user_error(run_inproc("train.py", f"--out_dir={out}", *TINY, *args, ok=False), needle)
    assert snapshot(out) == before


def test_a_busy_out_dir_is_refused_and_a_dead_runs_lock_taken_over(facts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "train.lock"
    args = [f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1", "--eval_facts=False",
            *TINY]
    with open(lock, "w") as held:  # a run in progress holds the lock (flock is per open file: this one conflicts)
        held.write("otherhost pid 12345 since 2026-12-02 10:00:00")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        p = run_inproc("train.py", *args, ok=False)
    assert_user_error(p, "in use by another training run (otherhost pid 12345", "another --out_dir")
    assert os.listdir(out) == ["train.lock"]  # the refused run touched nothing
    # the lock file a crashed run leaves is no longer locked (the OS dropped it with the process): taken over
    p = run_inproc("train.py", *args)
    assert not lock.exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 1


def test_resume_refuses_data_prepared_again(trained, facts, tmp_path):
    out, _ = trained
    copy = str(tmp_path / "facts")
    shutil.copytree(facts, copy)
    meta = json.load(open(os.path.join(copy, "meta.json")))
    meta["fingerprint"] = "0123456789abcdef"  # as if prepare_data.py --force had replaced it with other inputs
    json.dump(meta, open(os.path.join(copy, "meta.json"), "w"))
    before = snapshot(out)
    p = run_inproc("train.py", f"--data_dir={copy}", f"--out_dir={out}", "--init_from=resume", "--max_iters=8", *TINY,
                   ok=False)
    assert_user_error(p, "was trained on", "0123456789abcdef")
    assert snapshot(out) == before


def test_resume_lists_changed_keys_and_counts_tokens_on(trained, facts, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    args = [a for a in TINY if not a.startswith("--batch_size")]
    p = run_inproc("train.py", f"--data_dir={facts}", f"--out_dir={out}", "--init_from=resume", "--max_iters=8",
                   "--eval_interval=3", "--batch_size=2", *args)
    assert "resuming with changed training keys: batch_size 4 -> 2, max_iters 6 -> 8" in p.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    tokens = [r["tokens"] for r in rows if r["kind"] == "train"]
    assert tokens == sorted(tokens) and tokens[-1] == 6 * 4 * 32 + 2 * 2 * 32  # by hand: steps x batch x block
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["tokens"] == tokens[-1]


def test_resume_takes_the_checkpoints_training_keys(trained, tmp_path):
    """Only the folder and the new max_iters given: data_dir, batch_size, learning_rate, ... come
    from the checkpoint (the defaults would be data/facts, 32, 3e-3), so the run goes on as it was."""
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    p = run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=8")
    assert "resuming with changed training keys: max_iters 6 -> 8\n" in p.stdout  # only what was given
    cfg = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["train"]
    saved = torch.load(os.path.join(trained[0], "ckpt.pt"), weights_only=True)["config"]["train"]
    assert {k: v for k, v in cfg.items() if k not in ("max_iters", "init_from", "out_dir")} == \
        {k: v for k, v in saved.items() if k not in ("max_iters", "init_from", "out_dir")}
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["tokens"] for r in rows if r["kind"] == "train"][-1] == 8 * 4 * 32  # batch 4 all along


def test_resume_with_a_lower_learning_rate(facts, tmp_path):
    """The cross-key check (min_lr <= learning_rate) uses the checkpoint's min_lr, not the default 3e-4."""
    out = str(tmp_path / "run")
    run_inproc("train.py", f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
               "--learning_rate=1e-4", "--min_lr=1e-5", *[a for a in TINY if not a.startswith("--learning_rate")])
    p = run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=3", "--learning_rate=5e-5")
    assert "learning_rate 0.0001 -> 5e-05" in p.stdout
    p = run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--learning_rate=5e-6",
                   ok=False)
    assert_user_error(p, "min_lr=1e-05 must be in [0, learning_rate=5e-06]")


def test_resume_refuses_another_weight_decay(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    before = snapshot(out)
    p = run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=8", "--weight_decay=0.5",
                   ok=False)
    assert_user_error(p, "weight_decay cannot change on resume", "drop --weight_decay")
    assert snapshot(out) == before


def test_resume_survives_a_damaged_metrics_line(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    path = os.path.join(out, "metrics.jsonl")
    good = open(path).readlines()
    with open(path, "w") as f:
        f.writelines(good[:3] + ["garbage\n"] + good[3:] + ['{"kind": "train", "it'])  # a run killed mid-append
    p = run_inproc("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=7")
    assert "2 unreadable line(s) dropped" in p.stdout
    rows = open(path).readlines()
    assert rows[:len(good)] == good and json.loads(rows[-1])["iter"] == 7


def test_divergence_keeps_the_last_good_checkpoint(facts, tmp_path, capsys, monkeypatch):
    import train
    real, calls = train.evaluate, []

    def evaluate(*a, **k):  # finite at step 0, then a diverged model
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else {"train": float("nan"), "val": float("nan")}

    monkeypatch.setattr(train, "evaluate", evaluate)
    out = tmp_path / "run"
    code, _, err = train_main(capsys, f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2",
                              "--eval_facts=False", *TINY)
    assert code == 1 and err.startswith("error: training diverged at step 2") and "keeps step 0" in err, err
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 0
    calls.clear()  # --stop_on_nan=False (bench's stability runs): saved, and the run goes on
    out = tmp_path / "run2"
    train.main([f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2",
                "--eval_facts=False", "--stop_on_nan=False", *TINY])
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 4


@pytest.mark.parametrize("damage", ["meta_not_json", "meta_no_vocab", "bin_cut_short", "no_facts", "facts_no_chance",
                                    "no_tokenizer"])
def test_a_damaged_data_folder_is_one_line(facts, tmp_path, capsys, damage):
    d = tmp_path / "data"
    shutil.copytree(facts, d)
    if damage == "meta_not_json":
        (d / "meta.json").write_text("{")
    elif damage == "meta_no_vocab":
        meta = json.loads((d / "meta.json").read_text())
        del meta["vocab_size"]
        (d / "meta.json").write_text(json.dumps(meta))
    elif damage == "bin_cut_short":
        with open(d / "train.bin", "ab") as f:
            f.write(b"x")  # an odd byte count: not whole uint16 ids
    elif damage == "facts_no_chance":
        facts = json.loads((d / "facts.json").read_text())
        (d / "facts.json").write_text(json.dumps(dict(facts, chance={})))
    else:
        os.remove(d / ("facts.json" if damage == "no_facts" else "tokenizer.tiktoken"))
    code, _, err = train_main(capsys, f"--data_dir={d}", f"--out_dir={tmp_path / 'run'}", *TINY)
    assert code == 1 and err.count("\n") == 1 and "is damaged" in err and "prepare it again" in err, err
    assert not (tmp_path / "run").exists()


# ---- every value checked before any work ----------------------------------------------------------

BAD = [(["--batch_size=0"], "batch_size=0 must be at least 1"), (["--batch_size=-1"], "batch_size=-1"),
       (["--grad_accum=0"], "grad_accum=0"), (["--eval_iters=0"], "eval_iters=0"),
       (["--log_interval=0"], "log_interval"), (["--eval_interval=0"], "eval_interval=0"),
       (["--n_head=0"], "n_head=0"), (["--ffn_hidden=0"], "ffn_hidden=0"),
       (["--n_embd=100", "--n_head=3"], "not divisible by n_head=3"), (["--n_embd=132", "--n_head=4"], "is odd"),
       (["--learning_rate=-1"], "learning_rate=-1.0 must be positive"), (["--block_size=0"], "block_size=0"),
       (["--max_iters=-5"], "max_iters"), (["--min_lr=1"], "min_lr"), (["--grad_clip=0"], "grad_clip"),
       (["--learning_rate=inf"], "learning_rate=inf is not a finite number"),
       (["--weight_decay=nan"], "weight_decay=nan is not a finite number")]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_one_line_nothing_written(capsys, tmp_path, args, needle):
    out = tmp_path / "run"
    code, _, err = train_main(capsys, f"--out_dir={out}", *args)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists()


def test_out_dir_that_is_a_file_or_unwritable(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, err = train_main(capsys, f"--out_dir={f}")
    assert code == 1 and "is a file, not a folder" in err and err.count("\n") == 1
    assert f.read_text() == "mine"
    if os.path.isdir("/proc"):  # exists and refuses new files, even to root
        code, _, err = train_main(capsys, "--out_dir=/proc")
        assert code == 1 and "cannot write to out_dir /proc" in err and err.count("\n") == 1, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write to a read-only folder")
def test_read_only_out_dir(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = train_main(capsys, f"--out_dir={ro}")
        assert code == 1 and "cannot write to out_dir" in err
        code, _, err = train_main(capsys, f"--out_dir={ro}/sub")
        assert code == 1 and "cannot create out_dir" in err
    finally:
        ro.chmod(0o755)


def test_a_file_that_is_not_a_preset():
    assert_user_error(run_inproc("train.py", os.path.join(ROOT, "README.md"), ok=False), "README.md is not a preset",
                      "--key=value")


@pytest.mark.parametrize("script,key", [("train.py", "--max_iters"), ("sample.py", "--num_samples"),
                                        ("bench.py", "--mode"), ("prepare_data.py", "--entities")])
def test_help_lists_every_key_with_its_comment(script, key):
    """-h and --help print every key and exit 0 (a SystemExit(0) from inside the config parser)."""
    for flag in ("--help", "-h"):
        p = run_inproc(script, flag)
        assert key in p.stdout and "Traceback" not in p.stderr
    if script == "train.py":
        assert "optimizer steps" in p.stdout and "--keep_best=False" in p.stdout


def test_missing_preset_data_names_a_command_that_works(tmp_path):
    d = str(tmp_path / "facts400")
    p = run_inproc("train.py", os.path.join(ROOT, "presets", "facts400.py"), f"--data_dir={d}", ok=False)
    assert_user_error(p, "no prepared data")
    hint = p.stderr.split("`")[1]
    assert hint.startswith("python prepare_data.py ") and "--entities=400" in hint
    run_inproc(*shlex.split(hint)[1:])  # the hinted command itself succeeds
    assert json.load(open(os.path.join(d, "meta.json")))["dataset"] == "facts"


def test_missing_facts_data_elsewhere_names_its_folder(tmp_path):
    """prepare_data.py's default out_dir is data/facts: the hint for another folder named facts must name it."""
    from common import load_meta
    with pytest.raises(UserError, match=r"run `python prepare_data.py` first"):
        load_meta(os.path.join("data", "facts"))  # the default (the test's working folder is a temporary one)
    d = str(tmp_path / "mine" / "facts")
    with pytest.raises(UserError) as e:
        load_meta(d)
    hint = str(e.value).split("`")[1]
    assert hint == f"python prepare_data.py --out_dir={d}"
    run_inproc(*shlex.split(hint)[1:], "--entities=12")  # the hinted command prepares that folder
    assert load_meta(d)["dataset"] == "facts"


def test_read_metrics_drops_what_is_not_a_row(tmp_path, capsys):
    """One reader for metrics.jsonl (resume, plot, claims.py): rows kept in order, everything else counted."""
    from common import read_metrics
    rows = [dict(kind="train", iter=1, loss=5.0), dict(kind="eval", iter=1, tokens=64, val_loss=4.5, recall=0.1)]
    bad = ["[1, 2]", "null", '"text"', '{"iter": 2}', '{"kind": "train", "loss": 1}', '{"kind": "eval", "iter": 2}',
           '{"kind": "train", "iter": 2, "loss": "x"}', '{"kind": "x", "iter": 2}', "garbage", '{"kind": "tr']
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([json.dumps(rows[0])] + bad[:5] + ["", json.dumps(rows[1])] + bad[5:]))
    assert read_metrics(str(path)) == rows
    assert f"note: {path}: {len(bad)} unreadable line(s) dropped" in capsys.readouterr().out


@pytest.mark.parametrize("script,args,needle", [("train.py", ["--bogus=1"], "unknown config key 'bogus'"),
                                                ("sample.py", ["--top_k=0"], "top_k=0"),
                                                ("prepare_data.py", ["--entities=0"], "out of range"),
                                                ("bench.py", ["--mode=speed"], "mode='speed'")])
def test_entry_points(script, args, needle):
    """Each script started as a process: bad input is exit code 1 and one line on stderr, no traceback.
    (The other tests run the scripts' __main__ blocks in the test process: the same code.)"""
    assert_user_error(run(script, *args, ok=False), needle)


# ---- long runs say where they are, and how to continue -------------------------------------------

def test_progress_and_final_line_say_what_each_file_holds(facts, tmp_path):
    out = str(tmp_path / "run")
    p = run_inproc("train.py", f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=2",
                   "--keep_best", *TINY)
    assert "elapsed, ETA" in p.stdout and "tok/s" in p.stdout and "evaluating at step 2" in p.stdout
    last, best = (torch.load(os.path.join(out, f), weights_only=True) for f in ("ckpt.pt", "best.pt"))
    evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in evals if r["kind"] == "eval"]
    best_row = min(evals, key=lambda r: r["val_loss"])
    assert best["iter"] == best_row["iter"] == last["best_iter"] and last["iter"] == 6
    final = p.stdout.strip().splitlines()[-1]
    assert f"{out}/ckpt.pt holds the last step (val {evals[-1]['val_loss']:.4f})" in final
    assert f"best val {best_row['val_loss']:.4f} at step {best_row['iter']}, kept in {out}/best.pt" in final


def test_ctrl_c_leaves_a_whole_checkpoint_and_the_resume_command(facts, tmp_path):
    out = str(tmp_path / "run")
    args = [f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=2", "--eval_facts=False",
            *TINY]
    # SIGINT at its default in the child: a shell that runs the tests in the background ignores it, and
    # a child inherits an ignored signal (Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("step     5 "):  # checkpoints at 0, 2 and 4 have been written
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter"]
    assert step >= 4 and not [f for f in os.listdir(out) if f.endswith(".tmp") or f == "train.lock"]
    last = rest.strip().splitlines()[-1]
    assert f"{out}/ckpt.pt holds step {step}; continue with: python train.py --out_dir={out}" in last and last.endswith(
        "--init_from=resume")
    assert f"--data_dir={facts}" in last and "--max_iters=100000" in last  # what this run was given, repeated


# ---- bench.py: values checked, plots where the user points, checkpoints checked against their data

@pytest.mark.parametrize("args,needle", [(["--mode=speed"], "mode='speed'"), (["--steps=0"], "steps=0"),
                                         (["--batch_size=-2"], "batch_size=-2"), (["--shapes=128x512"], "shapes="),
                                         (["--cache_sizes=16,x"], "cache_sizes="), (["--n_head=3"], "not divisible"),
                                         (["--mode=decode", "--ffn=swiglu"], "has none"),
                                         (["--mode=decode", "--n_layer=1"], "has none"),
                                         (["--mode=offload", "--shape=model", "--ffn=swiglu"], "no table layers")])
def test_bench_bad_values(args, needle):
    assert_user_error(run_inproc("bench.py", "--device=cpu", *args, ok=False), needle)


def test_bench_plots_stay_out_of_tracked_files(facts, tmp_path):
    tracked = os.path.join(ROOT, "assets", "decode_hit_rate.png")
    before = open(tracked, "rb").read()
    args = [f"--data_dir={facts}", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=64",
            "--block_size=32", "--batch_size=2", "--steps=1", "--decode_tokens=2", "--cache_sizes=16"]
    run_inproc("bench.py", "--mode=decode", *args, cwd=tmp_path)  # the plot's default folder is under cwd
    assert os.path.getsize(tmp_path / "out" / "bench" / "decode_hit_rate.png") > 1000
    assert open(tracked, "rb").read() == before


def test_bench_decode_refuses_a_checkpoint_of_other_data(trained, tmp_path):
    ckpt = torch.load(os.path.join(trained[0], "ckpt.pt"), weights_only=True)
    ckpt["data"]["fingerprint"] = "fedcba9876543210"  # as if its data folder had been prepared again since
    torch.save(ckpt, tmp_path / "ckpt.pt")
    p = run_inproc("bench.py", "--mode=decode", "--device=cpu", f"--ckpt={tmp_path}/ckpt.pt", ok=False)
    assert_user_error(p, "fedcba9876543210", "--data_dir")
    p = run_inproc("bench.py", "--mode=decode", "--device=cpu", f"--ckpt={trained[0]}/ckpt.pt", "--n_layer=7", ok=False)
    assert_user_error(p, "--ckpt brings its own model: drop --n_layer")


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    """An interrupted save (Ctrl-C or a full disk mid-write) leaves the previous checkpoint's bytes
    and no half file: the write goes to a temporary name and is renamed only when complete."""
    import common
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"iter": 1, "w": torch.ones(3)})
    before = snapshot(tmp_path)

    def half_then_interrupt(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"iter": 2, "w": torch.zeros(3)})
    assert snapshot(tmp_path) == before and list(before) == ["ckpt.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["iter"] == 1


def test_a_checkpoint_of_another_code_version_is_one_line(trained):
    from common import load_checkpoint, model_from_checkpoint
    from configurator import UserError
    ckpt = load_checkpoint(os.path.join(trained[0], "ckpt.pt"))
    extra = dict(ckpt, config=dict(ckpt["config"], model=dict(ckpt["config"]["model"], new_key=1)))
    with pytest.raises(UserError, match="does not fit this code's GPTConfig"):
        model_from_checkpoint(extra)
    wide = dict(ckpt, model={k: (torch.zeros(v.size(0) + 1, *v.shape[1:]) if k == "lm_head.weight" else v)
                             for k, v in ckpt["model"].items()})
    with pytest.raises(UserError, match="shape does not match"):
        model_from_checkpoint(wide)


def test_a_device_string_that_is_not_one(capsys, tmp_path):
    code, _, err = train_main(capsys, "--device=cpu:x", f"--out_dir={tmp_path / 'run'}")
    assert code == 1 and "device='cpu:x' is not one of" in err


def test_token_ids_outside_the_vocabulary_are_one_line(facts, tmp_path, capsys):
    d = tmp_path / "data"
    shutil.copytree(facts, d)
    ids = np.fromfile(d / "train.bin", dtype=np.uint16)
    ids[:] = json.loads((d / "meta.json").read_text())["vocab_size"] + 5  # as if written with another tokenizer
    ids.tofile(d / "train.bin")
    code, _, err = train_main(capsys, f"--data_dir={d}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2", *TINY)
    assert code == 1 and err.count("\n") == 1 and "not below the vocabulary" in err, err

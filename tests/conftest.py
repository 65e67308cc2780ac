"""Shared test helpers: tiny configs, running a script (as a process, or its __main__ block in this
process), its one error line, and the tiny prepared data and trained run most script tests start from.
The tests write only into temporary folders, whatever the working tree holds (a user's out/ or data/)."""
import os
import sys

# CUDA tests that ask for deterministic algorithms need this before cuBLAS starts
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# tiny models gain nothing from a second intra-op thread, and on a busy machine its waits make each op
# many times slower: one thread, here and in the scripts the tests start (they inherit it), unless set
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def seed(tmp_path_factory, monkeypatch):
    """The same seed, and an empty working folder of its own, for every test: the scripts' defaults
    (out_dir=out, data_dir=data/facts) then land in a temporary folder, never in the repository."""
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def tiny_config(**kw):
    from model import GPTConfig
    base = dict(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=16, ffn_hidden=24,
                ffn="stem", stem_layers="all")
    base.update(kw)
    return GPTConfig(**base)


def needs_file(var, what):
    """A public file a test cannot download (CI has no network): its path in the environment, else a skip."""
    return pytest.mark.skipif(not os.environ.get(var), reason=f"{var} is not set (the path of a local copy of {what})")


GPT2_BPE = needs_file("NANOSTEM_GPT2_BPE", "GPT-2's BPE file r50k_base.tiktoken")
SHAKESPEARE = needs_file("NANOSTEM_SHAKESPEARE", "the Tiny Shakespeare text")


# ---- shared by the script tests: tiny training settings, running a script, its error line, fixtures

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=64", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=2"]


def run(script, *args, ok=True, inproc=False, cwd=None):
    """python SCRIPT ARGS, from cwd or else a fresh temporary folder (so that the defaults out_dir=out and
    data_dir=data/facts never touch the repository). inproc=True runs the script's __main__ block in this
    process: the same argv, folder, output and exit code, without starting Python and importing torch
    again (~1.5 s a call). A subprocess is kept where the process is the test: the entry points' exit
    code and stderr (test_robustness.test_entry_points), a signal, torchrun."""
    argv = [os.path.join(ROOT, script), *args]
    with tempfile.TemporaryDirectory() as tmp:
        p = _main_here(argv, cwd or tmp) if inproc else subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, cwd=cwd or tmp, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def run_inproc(script, *args, ok=True, cwd=None):
    return run(script, *args, ok=ok, inproc=True, cwd=cwd)


def _main_here(argv, cwd):
    """What `python *argv` run from cwd does, in this process: its output, and its exit code."""
    out, err, code, here, saved = io.StringIO(), io.StringIO(), 0, os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    finally:
        os.chdir(here)
        sys.argv = saved
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_user_error(p, *needles):
    """One clear line on stderr, exit code 1, no traceback."""
    assert p.returncode == 1, (p.stdout[-1000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="session")
def facts(tmp_path_factory):
    """A tiny prepared facts folder, shared by every test: tests that change data change a copy."""
    import prepare_data
    d = str(tmp_path_factory.mktemp("data") / "facts")
    prepare_data.prepare(dataset="facts", out_dir=d, entities=12, progress=False)
    return d


@pytest.fixture(scope="session")
def trained(facts, tmp_path_factory):
    """A tiny trained run (6 steps, checkpoints at 3 and 6), shared: tests that write there use a copy."""
    out = str(tmp_path_factory.mktemp("out"))
    p = run_inproc("train.py", f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3", *TINY)
    return out, p


def _train_inproc(*args):
    import train
    train.main(list(args))


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "train"]

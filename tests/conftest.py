import os
import sys

# CUDA tests that ask for deterministic algorithms need this before cuBLAS starts
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import json  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def tiny_config(**kw):
    from model import GPTConfig
    base = dict(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=16, ffn_hidden=24,
                ffn="stem", stem_layers="all")
    base.update(kw)
    return GPTConfig(**base)


# ---- shared by the script tests: tiny training settings, running a script, its error line, fixtures

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--ffn_hidden=64", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=2"]


def run(script, *args, ok=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def assert_user_error(p, *needles):
    """One clear line on stderr, exit code 1, no traceback."""
    assert p.returncode == 1, (p.stdout[-1000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    import prepare_data
    d = str(tmp_path_factory.mktemp("data") / "facts")
    prepare_data.prepare(dataset="facts", out_dir=d, entities=12, progress=False)
    return d


@pytest.fixture(scope="module")
def trained(facts, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    p = run("train.py", f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3", *TINY)
    return out, p


def _train_inproc(*args):
    import train
    train.main(list(args))


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "train"]

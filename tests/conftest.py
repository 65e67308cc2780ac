import os
import sys

# CUDA tests that ask for deterministic algorithms need this before cuBLAS starts
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

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

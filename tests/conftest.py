import os
import sys

import pytest
import torch

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

#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one NVIDIA GPU and PyTorch (2.11 or newer)
# already installed; it needs no network and installs nothing:
#
#   bash gpu_check.sh                 # about 5 minutes (its sections' time limits add up to 8); writes gpu_report.txt
#
# 1. the CUDA tests (bf16 offload vs resident, GPU memory saved, the stress run), if pytest is there
# 2. bench.py --mode offload at the GPT-2-small shape: host rates against their floor, pinned copy
#    rates, the step model's prediction, and the MEASURED offloaded vs resident-lazy training
#    tokens/s, GPU memory saved and MFU (12 layers, d 768, GPT-2 vocabulary, STEM in 1/3 of layers)
# 3. bench.py --mode decode: prefill and decode tokens/s, resident vs offloaded with the row cache
# Data: data/shakespeare-gpt2 if it is there (prepare it on another machine and copy it along), else
# Tiny Shakespeare with GPT-2's BPE from ../shared/data when tiktoken is installed, else a
# Zipf-distributed stand-in of the same vocabulary (said in the report). Python: python3, or PYTHON=...
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3 || command -v python)}  # or PYTHON=/path/to/python bash gpu_check.sh
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
  echo "error: gpu_check.sh needs a CUDA GPU and PyTorch with CUDA ($PY: torch.cuda.is_available() is False or torch is missing)" >&2
  exit 1
}
$PY -c "import numpy" 2>/dev/null || {
  echo "error: gpu_check.sh needs numpy beside torch (the data loader memory-maps the token files with it)" >&2
  exit 1
}
REPORT=${REPORT:-gpu_report.txt}
DATA=data/shakespeare-gpt2
exec > >(tee "$REPORT") 2>&1
echo "# nanoSTEM gpu_check.sh | $(date -u +%F) | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
$PY -c "import torch; print('#', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
$PY - <<'EOF'
import importlib.util
print("# optional packages:", ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'no'}"
                                        for m in ("pytest", "tiktoken", "tqdm", "matplotlib")))
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# /'

if [ ! -f $DATA/meta.json ]; then
  if $PY -c "import tiktoken, regex, tqdm" 2>/dev/null && [ -f ../shared/data/tinyshakespeare.txt ]; then
    $PY prepare_data.py --dataset shakespeare --input ../shared/data/tinyshakespeare.txt \
      --tokenizer ../shared/data/r50k_base.tiktoken --out_dir $DATA
  fi
  if [ ! -f $DATA/meta.json ]; then
    DATA=data/zipf-50257
    echo "# no data/shakespeare-gpt2, and it could not be made here (needs tiktoken, regex, tqdm and ../shared/data): a Zipf stand-in with GPT-2's vocabulary size ($DATA)"
    $PY - <<'EOF'
import json, os
import numpy as np
d = "data/zipf-50257"
os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
p = 1.0 / np.arange(1, 50258) ** 1.1  # Zipf over ranks, roughly the shape of BPE token frequencies
p /= p.sum()
for split, n in (("train", 4_000_000), ("val", 400_000)):
    rng.choice(50257, size=n, p=p).astype(np.uint16).tofile(f"{d}/{split}.bin")
json.dump(dict(dataset="zipf", vocab_size=50257, dtype="uint16", train_tokens=4_000_000, val_tokens=400_000),
          open(f"{d}/meta.json", "w"))
EOF
  fi
fi

echo; echo "## 1. CUDA tests"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 120 $PY -m pytest -q tests/test_offload.py tests/test_tables.py -k cuda -rs
else
  echo "pytest is not installed here: CUDA tests not run"
fi

echo; echo "## 2. offload at the GPT-2-small shape: rates, prediction, measured training"
timeout 270 $PY bench.py --mode offload --data_dir=$DATA --steps=10 --burn_in=3

echo; echo "## 3. prefill and decode, resident vs offloaded with the row cache"
timeout 90 $PY bench.py --mode decode --data_dir=$DATA --n_layer=12 --n_head=12 --n_embd=768 --ffn_hidden=2048 \
  --block_size=1024 --stem_layers=third --batch_size=8 --decode_tokens=64 --cache_sizes=256,1024,4096 --steps=3 \
  --plot_dir=out/gpu_check

echo; echo "# report: $REPORT"

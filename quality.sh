#!/usr/bin/env bash
# The quality sequence: SwiGLU and STEM (third, half, all) at equal steps and tokens, three seeds,
# on the facts world and on Tiny Shakespeare; then one results table and two plots.
#   bash quality.sh                      # everything (about an hour on a 2-core CPU)
#   SEEDS="1" DATASETS="facts400" bash quality.sh
# Offline, point SHAKESPEARE and TOKENIZER at local files (defaults: download / tiktoken's gpt2).
set -euo pipefail
SEEDS=${SEEDS:-"1 2 3"}
DATASETS=${DATASETS:-"facts400 shakespeare"}
SHAKESPEARE=${SHAKESPEARE:-}
TOKENIZER=${TOKENIZER:-gpt2}
[ -f data/facts400/meta.json ] || python prepare_data.py --entities 400 --out_dir data/facts400
if [[ " $DATASETS " == *" shakespeare "* && ! -f data/shakespeare-gpt2/meta.json ]]; then
  python prepare_data.py --dataset shakespeare ${SHAKESPEARE:+--input "$SHAKESPEARE"} --tokenizer "$TOKENIZER" \
    --out_dir data/shakespeare-gpt2
fi
for ds in $DATASETS; do
  for seed in $SEEDS; do
    for arch in swiglu stem-third stem-half stem-all; do
      out=runs/$ds-$arch-s$seed
      if [ -f "$out/ckpt.pt" ] && python -c "import sys, torch; c = torch.load('$out/ckpt.pt', weights_only=True); \
          sys.exit(c['iter'] != c['config']['train']['max_iters'])"; then
        continue  # finished runs are kept: the sequence can be resumed
      fi
      if [ "$arch" = swiglu ]; then a="--ffn=swiglu"; else a="--ffn=stem --stem_layers=${arch#stem-}"; fi
      resume=""; [ -f "$out/ckpt.pt" ] && resume="--init_from=resume"  # an interrupted run continues
      echo "== $out"
      python train.py presets/$ds.py $a --seed=$seed --out_dir=$out --compile=False $resume > /dev/null
    done
  done
done
python bench.py --mode quality --runs runs --plot_dir=assets  # the README's plots

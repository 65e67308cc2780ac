#!/usr/bin/env bash
# The STEM paper's claims at small scale, as one resumable sequence on a CPU (the modes: python claims.py --help):
#   1-3  quality: STEM vs SwiGLU, more STEM layers, the ablations   facts400 and Shakespeare: SwiGLU and STEM in
#        third / half / all of the layers; Shakespeare: stem_gate, stem_add, hash_moe in a third    claims.py quality
#   4    loss spikes: swiglu, stem, hash_moe, Shakespeare preset at its learning rate and at 3x   claims.py stability
#   5    angular spread of the rows: Shakespeare STEM third and all vs SwiGLU, per seed          claims.py spread
#   6    edits: success, locality, control: facts400 STEM third / half / all, per seed           claims.py locality
#   7    Heaps' law, loss by position: Shakespeare STEM third and all vs SwiGLU, per seed        claims.py context
#   10   needle in a haystack at context 512: STEM half vs SwiGLU, per seed (presets/needle.py)   claims.py needle
# and last, claims.py summary: every per-seed figure as mean ± sd over the seeds.
# Runs go to runs/ (runs/DATASET-ARCH-sSEED, the names claims.py --mode quality reads) and runs/claims/stability/;
# outputs to runs/claims/NAME.txt (each ends with its JSON line), runs/claims/plots*/ and runs/claims/summary.txt.
# Cost on a 2-core CPU: about 4.5 hours from nothing (the 33 quality runs about 1 h 45 min, the 18 stability runs
# about 40 min, the claims.py modes about 15 min, the 6 needle runs about 1 h 30 min).
# Resumable: a finished run is kept and an interrupted one continues (--init_from=resume); an output that finished
# (runs/claims/NAME.txt) is not redone, nor are the runs only it reads trained: delete it to redo it (and delete
# runs/claims/stability to train those runs again with other settings).
#   bash claims.sh
#   CLAIMS="4 5-7" bash claims.sh                  # parts: "1-3", "4", "5-7", "10"
#   SEEDS="1" STABILITY_STEPS=40 bash claims.sh    # a quick look: one seed shows no difference beyond noise
# Offline: NANOSTEM_SHAKESPEARE=PATH/tinyshakespeare.txt NANOSTEM_GPT2_BPE=PATH/r50k_base.tiktoken bash claims.sh
# (unset: Tiny Shakespeare is downloaded, and GPT-2's BPE comes from tiktoken's gpt2).
set -euo pipefail
SEEDS=${SEEDS:-"1 2 3"}
CLAIMS=${CLAIMS:-"1-3 4 5-7 10"}
STABILITY_STEPS=${STABILITY_STEPS:-100}
OUT=runs/claims
mkdir -p "$OUT"
part() { [[ " $CLAIMS " == *" $1 "* ]]; }
needs_facts_and_shakespeare() { part 1-3 || part 4 || part 5-7; }
if needs_facts_and_shakespeare && [ ! -f data/facts400/meta.json ]; then
  python prepare_data.py --entities 400 --out_dir data/facts400
fi
if needs_facts_and_shakespeare && [ ! -f data/shakespeare-gpt2/meta.json ]; then
  python prepare_data.py --dataset shakespeare ${NANOSTEM_SHAKESPEARE:+--input "$NANOSTEM_SHAKESPEARE"} \
    --tokenizer "${NANOSTEM_GPT2_BPE:-gpt2}" --out_dir data/shakespeare-gpt2
fi

ckpt() {  # ckpt OUT_DIR EXPR: EXPR of its checkpoint c, e.g. c['iter'] (0 without a checkpoint)
  if [ -f "$1/ckpt.pt" ]; then python -c "import torch; c = torch.load('$1/ckpt.pt', weights_only=True); print($2)"
  else echo 0; fi
}

train() {  # train OUT_DIR ARGS...: skipped when finished, continued when interrupted
  local out=$1; shift
  [ "$(ckpt "$out" "int(c['iter'] == c['config']['train']['max_iters'])")" = 1 ] && return 0
  local resume=""; [ -f "$out/ckpt.pt" ] && resume="--init_from=resume"  # train.py refuses a fresh start over it
  echo "== $out"
  python train.py "$@" --out_dir="$out" --compile=False $resume > /dev/null
}

finished() {  # finished NAME: runs/claims/NAME.txt holds a finished output (a JSON last line)
  [ -f "$OUT/$1.txt" ] && tail -n 1 "$OUT/$1.txt" | grep -q '^{'
}

claim() {  # claim NAME ARGS...: python claims.py ARGS > runs/claims/NAME.txt, skipped when finished
  local name=$1; shift
  finished "$name" && return 0
  echo "== $OUT/$name.txt"
  python claims.py "$@" > "$OUT/$name.txt.tmp"
  mv "$OUT/$name.txt.tmp" "$OUT/$name.txt"
}

run() {  # run DATASET ARCH SEED: runs/DATASET-ARCH-sSEED with presets/DATASET.py
  local a="--ffn=stem --stem_layers=${2#stem-}"; [ "$2" = swiglu ] && a="--ffn=swiglu"
  train "runs/$1-$2-s$3" presets/$1.py $a --seed=$3
}

# ---- claims 1-3: validation loss, recall, edit success per model, mean ± sd over seeds
if part 1-3 && ! finished quality; then
  for seed in $SEEDS; do
    for ds in facts400 shakespeare; do
      for arch in swiglu stem-third stem-half stem-all; do run $ds $arch $seed; done
    done
    for ffn in stem_gate stem_add hash_moe; do  # the paper's ablations replace STEM in STEM's layers (a third)
      train "runs/shakespeare-$ffn-third-s$seed" presets/shakespeare.py --ffn=$ffn --stem_layers=third --seed=$seed
    done
  done
fi
part 1-3 && claim quality --mode quality --runs_dir=runs --plot_dir="$OUT/plots"

# ---- claim 4: loss spikes, in short runs of their own (runs/claims/stability)
if part 4 && ! finished stability; then
  for seed in $SEEDS; do
    for m in 1 3; do  # the preset's learning_rate (1e-3) and min_lr (1e-4), times m
      for ffn in swiglu stem hash_moe; do
        train "$OUT/stability/$ffn-lr${m}x-s$seed" presets/shakespeare.py --ffn=$ffn --stem_layers=third \
          --learning_rate=${m}e-3 --min_lr=${m}e-4 --seed=$seed --max_iters="$STABILITY_STEPS" \
          --eval_interval="$STABILITY_STEPS" --eval_iters=2 --eval_facts=False \
          --stop_on_nan=False  # a diverged run is data here, not an error
      done
    done
  done
fi
part 4 && claim stability --mode stability --runs_dir="$OUT/stability" --spike_window=20 --spike_margin=0.5 \
  --plot_dir="$OUT/plots"

# ---- claims 5, 7 (per seed, each STEM run against the SwiGLU run of the same seed) and 6
for seed in $SEEDS; do
  part 5-7 || break
  for arch in stem-third stem-all; do
    if ! finished "spread-$arch-s$seed" || ! finished "context-$arch-s$seed"; then
      run shakespeare swiglu $seed; run shakespeare $arch $seed
    fi
    claim "spread-$arch-s$seed" --mode spread --ckpt="runs/shakespeare-$arch-s$seed" \
      --ckpt_swiglu="runs/shakespeare-swiglu-s$seed" --spread_ids=256 --plot_dir="$OUT/plots-spread-$arch-s$seed"
    claim "context-$arch-s$seed" --mode context --ckpt="runs/shakespeare-$arch-s$seed" \
      --ckpt_swiglu="runs/shakespeare-swiglu-s$seed" --context_max=2048 --context_batches=16 \
      --plot_dir="$OUT/plots-context-$arch-s$seed"
  done
  for arch in stem-third stem-half stem-all; do
    finished "locality-$arch-s$seed" || run facts400 $arch $seed
    claim "locality-$arch-s$seed" --mode locality --ckpt="runs/facts400-$arch-s$seed" --locality_pairs=200 \
      --plot_dir="$OUT/plots-locality-$arch-s$seed"
  done
done

# ---- claim 10: needle in a haystack, STEM's advantage by context (the data: prepare_data.py --dataset needle)
needle() {  # needle OUT_DIR ARGS...: presets/needle.py, its first 2,000 steps at context 128, then on at 512 to
  local out=$1; shift  # its max_iters, 3,000 (the cosine is recomputed over 3,000 steps: lr 1e-3 -> 1.5e-3 at 2,000)
  [ "$(ckpt "$out" "c['iter']")" -ge 2000 ] ||
    train "$out" presets/needle.py "$@" --block_size=128 --batch_size=16 --max_iters=2000
  [ "$(ckpt "$out" "c['iter']")" -ge 3000 ] || { echo "== $out (context 512)"
    python train.py presets/needle.py "$@" --out_dir="$out" --compile=False --init_from=resume > /dev/null; }
}
part 10 && python prepare_data.py --dataset needle  # nothing to do when prepared; an error when prepared otherwise
for seed in $SEEDS; do
  part 10 || break
  if ! finished "needle-stem-half-s$seed"; then
    needle "runs/needle-swiglu-s$seed" --ffn=swiglu --seed=$seed
    needle "runs/needle-stem-half-s$seed" --ffn=stem --stem_layers=half --seed=$seed
  fi
  claim "needle-stem-half-s$seed" --mode needle --ckpt="runs/needle-stem-half-s$seed" \
    --ckpt_swiglu="runs/needle-swiglu-s$seed" --needle_trials=40 --plot_dir="$OUT/plots-needle-stem-half-s$seed"
done

# ---- one table of the per-seed figures (mean ± sd and the values per seed)
python claims.py --mode summary --claims_dir="$OUT" | tee "$OUT/summary.txt"

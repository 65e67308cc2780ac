#!/usr/bin/env bash
# The paper's claims at small scale (../shared/docs/STEM_NOTES.md s. 8), as one resumable sequence on a CPU:
#   1-2  STEM vs SwiGLU, more STEM layers     quality.sh's runs (facts400 and shakespeare, 3 seeds)
#   3    the ablations at STEM's layers        shakespeare: stem_gate, stem_add, hash_moe at third, 3 seeds
#   4    loss spikes                           bench --mode stability: swiglu, stem, hash_moe, lr 1x and 3x, 3 seeds
#   5    angular spread of the rows            bench --mode spread, per seed (STEM third and all vs SwiGLU)
#   6    edits: success, locality, control     bench --mode locality, per seed (facts400, STEM third/half/all)
#   7    Heaps' law, loss by position          bench --mode context, per seed (STEM third and all vs SwiGLU)
# Outputs: runs/claims/*.txt (each ends with its JSON line), runs/claims/plots*/, runs/claims/summary.txt.
#
# Measured 2026-12-02 (2-core VM, niced behind other work): CLAIMS="4 5-7" with 3 seeds took about 2 h 20 min
# (stability runs ~110 s each; Shakespeare and facts400 runs ~5 min each). The older estimate follows.
# Time on a quiet 2-core CPU, estimated (not measured end to end), from the README's rates (Shakespeare
# preset: SwiGLU ~1,085 tok/s = ~0.95 s a step, STEM third ~1.05 s) and timed 20-step runs of the preset
# (2026-12-02, a busy shared 2-core machine: 126 s SwiGLU, 177 s hash_moe, so hash_moe ~1.4x SwiGLU; steps
# there took ~5 s, not ~1 s: on a machine that busy, multiply everything below by up to 5):
#   quality.sh's 24 runs, if runs/ lacks them                      ~60 min (quality.sh's own figure)
#   9 ablation runs (200 steps + 5 evaluations each)              ~45 min
#   stability: 18 runs of 100 steps                               ~40 min
#   the bench modes (spread 6x ~10 s, context 6x ~40 s, locality 9x ~45 s, quality ~3 min)   ~15 min
#   total: about 1 h 40 min with quality.sh's runs present, about 2 h 40 min from nothing.
# Resumable: finished runs are kept (an interrupted one continues with --init_from=resume), and a bench
# output that finished (runs/claims/NAME.txt) is not redone (delete it to redo it), nor are the runs
# that only it reads trained. Each part trains only
# the runs it reads, so CLAIMS picks parts: "1-3" (quality.sh's 24 runs, the 9 ablation runs, the quality
# bench), "4", "5-7" (Shakespeare SwiGLU/third/all and facts400 third/half/all per seed).
#   bash claims.sh
#   CLAIMS="4 5-7" bash claims.sh               # claims 4-7 only: 18 runs + 18 stability runs + the benches
#   SEEDS="1" STABILITY_STEPS=40 bash claims.sh # a quick look: no claim of a difference from one seed
# Offline, point SHAKESPEARE and TOKENIZER at local files (defaults: download / tiktoken's gpt2).
set -euo pipefail
SEEDS=${SEEDS:-"1 2 3"}
CLAIMS=${CLAIMS:-"1-3 4 5-7"}
STABILITY_STEPS=${STABILITY_STEPS:-100}
SHAKESPEARE=${SHAKESPEARE:-}
TOKENIZER=${TOKENIZER:-gpt2}
OUT=runs/claims
mkdir -p "$OUT"
[ -f data/facts400/meta.json ] || python prepare_data.py --entities 400 --out_dir data/facts400
if [ ! -f data/shakespeare-gpt2/meta.json ]; then
  python prepare_data.py --dataset shakespeare ${SHAKESPEARE:+--input "$SHAKESPEARE"} --tokenizer "$TOKENIZER" \
    --out_dir data/shakespeare-gpt2
fi

train() {  # train OUT_DIR ARGS...: skipped when finished, continued when interrupted
  local out=$1; shift
  if [ -f "$out/ckpt.pt" ] && python -c "import sys, torch; c = torch.load('$out/ckpt.pt', weights_only=True); \
      sys.exit(c['iter'] != c['config']['train']['max_iters'])"; then
    return 0  # finished runs are kept: the sequence can be resumed
  fi
  local resume=""; [ -f "$out/ckpt.pt" ] && resume="--init_from=resume"  # train.py refuses a fresh start over it
  echo "== $out"
  python train.py "$@" --out_dir="$out" --compile=False $resume > /dev/null
}

finished() {  # finished NAME: runs/claims/NAME.txt holds a finished bench run (a JSON last line)
  [ -f "$OUT/$1.txt" ] && tail -n 1 "$OUT/$1.txt" | grep -q '^{'
}

bench() {  # bench NAME ARGS...: runs/claims/NAME.txt, skipped when finished
  local name=$1; shift
  finished "$name" && return 0
  echo "== $OUT/$name.txt"
  python bench.py "$@" > "$OUT/$name.txt.tmp"
  mv "$OUT/$name.txt.tmp" "$OUT/$name.txt"
}

run() {  # run DATASET ARCH SEED: quality.sh's runs (same names, so either script reuses the other's)
  local a="--ffn=stem --stem_layers=${2#stem-}"; [ "$2" = swiglu ] && a="--ffn=swiglu"
  train "runs/$1-$2-s$3" presets/$1.py $a --seed=$3
}
part() { [[ " $CLAIMS " == *" $1 "* ]]; }

# ---- claims 1-3: validation loss, recall, edit success per model, mean ± sd over seeds
if part 1-3; then
  for seed in $SEEDS; do
    for ds in facts400 shakespeare; do
      for arch in swiglu stem-third stem-half stem-all; do run $ds $arch $seed; done
    done
    for ffn in stem_gate stem_add hash_moe; do  # the paper's ablations replace STEM in STEM's layers (1/3)
      train "runs/shakespeare-$ffn-third-s$seed" presets/shakespeare.py --ffn=$ffn --stem_layers=third --seed=$seed
    done
  done
  bench quality --mode quality --runs runs --plot_dir="$OUT/plots"
fi

# ---- claim 4: loss spikes (its own short runs, kept in runs/claims/stability)
part 4 && bench stability --mode stability --data_dir=data/shakespeare-gpt2 --train_preset=presets/shakespeare.py \
  --stem_layers=third --stability_seeds="$(echo $SEEDS | tr ' ' ',')" --stability_lrs=1,3 --stability_steps="$STABILITY_STEPS" \
  --spike_window=20 --spike_margin=0.5 --stability_dir="$OUT/stability" --plot_dir="$OUT/plots"

# ---- claims 5, 7 (per seed, each STEM run against the SwiGLU run of the same seed) and 6
for seed in $SEEDS; do  # a bench that finished needs no checkpoints: its runs are trained only if it did not
  part 5-7 || break
  for arch in stem-third stem-all; do
    if ! finished "spread-$arch-s$seed" || ! finished "context-$arch-s$seed"; then
      run shakespeare swiglu $seed; run shakespeare $arch $seed
    fi
    bench "spread-$arch-s$seed" --mode spread --ckpt="runs/shakespeare-$arch-s$seed" \
      --ckpt_swiglu="runs/shakespeare-swiglu-s$seed" --spread_ids=256 --plot_dir="$OUT/plots-spread-$arch-s$seed"
    bench "context-$arch-s$seed" --mode context --ckpt="runs/shakespeare-$arch-s$seed" \
      --ckpt_swiglu="runs/shakespeare-swiglu-s$seed" --context_max=2048 --context_batches=16 \
      --plot_dir="$OUT/plots-context-$arch-s$seed"
  done
  for arch in stem-third stem-half stem-all; do
    finished "locality-$arch-s$seed" || run facts400 $arch $seed
    bench "locality-$arch-s$seed" --mode locality --ckpt="runs/facts400-$arch-s$seed" --locality_pairs=200 \
      --plot_dir="$OUT/plots-locality-$arch-s$seed"
  done
done

# ---- one table of the per-seed figures (mean and the values per seed)
python - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, statistics, sys
out = sys.argv[1]
def last(name):
    return json.loads(open(os.path.join(out, name)).read().strip().splitlines()[-1])
def runs(prefix):
    return [last(os.path.basename(p)) for p in sorted(glob.glob(os.path.join(out, prefix + "-s*.txt")))]
def show(label, vals, f=".4f"):
    vals = [v for v in vals if v is not None]
    if vals:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{label:50s} {statistics.mean(vals):{f}} ± {sd:{f.lstrip('+')}}   per seed: " + " ".join(f"{v:{f}}" for v in vals))
print("claims 1-3: see quality.txt (val loss, recall and edit success per model, mean ± sd over seeds)")
if os.path.exists(os.path.join(out, "stability.txt")):
    st = last("stability.txt")["stability"]
    print(f"claim 4: loss spikes per run ({st['definition']}; W {st['window']}, margin {st['margin']} nats, {st['steps']} steps)")
    for s in st["summary"]:
        print(f"  {s['ffn']:9s} lr {s['lr_mult']:g}x: spikes per seed {s['spikes_per_seed']}, mean {s['spikes_mean']:.2f}")
for arch in ("stem-third", "stem-all"):
    sp = [r["spread"] for r in runs(f"spread-{arch}")]
    print(f"claim 5 ({arch}, headline layer): pairwise |cos| of rows, median / P95")
    for k in ("trained", "init", "random", "swiglu_up"):
        show(f"  {k} median", [s[k]["median"] for s in sp if s[k]])
        show(f"  {k} P95", [s[k]["p95"] for s in sp if s[k]])
for arch in ("stem-third", "stem-half", "stem-all"):
    loc = [r["locality"] for r in runs(f"locality-{arch}")]
    print(f"claim 6 ({arch}, facts400)")
    for k in ("fact_recall", "edit_success", "unchanged", "c_correct", "c_correct_edited", "control_unchanged"):
        show(f"  {k}", [r[k] for r in loc])
for arch in ("stem-third", "stem-all"):
    ctx = [r["context"] for r in runs(f"context-{arch}")]
    if ctx:
        print(f"claim 7 ({arch}): Heaps k {ctx[0]['heaps_k']:.3f}, beta {ctx[0]['heaps_beta']:.3f}; val loss STEM - SwiGLU")
        show("  mean over positions", [c["mean_diff"] for c in ctx], "+.4f")
        show("  first quarter of the block", [c["diff_first_quarter"] for c in ctx], "+.4f")
        show("  last quarter of the block", [c["diff_last_quarter"] for c in ctx], "+.4f")
        show("  slope per position (negative: advantage grows)", [c["slope"] for c in ctx], "+.2e")
EOF

# Needle in a haystack at context 512 (claims.sh, claim 10): small models trained to retrieve from the context.
# Copying from the context (induction heads) appears suddenly, after many steps of a high learning rate, and first
# at short distances: the first 2,000 steps run at context 128, then the run goes on at 512 (positions carry no
# weights with RoPE) to 3,000, its cosine recomputed (lr 1e-3 -> 1.5e-3 at step 2,000); about 15 min a run on 2
# cores. The documents stay short at 512 (a needle at most ~100 tokens before its question): more of them a window.
#   python prepare_data.py --dataset needle
#   python train.py presets/needle.py --block_size=128 --batch_size=16 --max_iters=2000 --ffn=swiglu --out_dir=runs/a
#   python train.py presets/needle.py --ffn=swiglu --out_dir=runs/a --init_from=resume      # on at context 512
#   (the same twice with --ffn=stem --stem_layers=half --out_dir=runs/b)
#   python claims.py --mode needle --ckpt=runs/b --ckpt_swiglu=runs/a
data_dir = "data/needle"
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512
block_size = 512
batch_size = 4
max_iters = 3000
eval_interval = 500
eval_iters = 5
learning_rate = 3e-3
min_lr = 1e-3
warmup_iters = 100
table_optimizer = "dense"  # 1,024 rows: dense AdamW costs little here
eval_facts = False

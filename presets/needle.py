# Needle in a haystack at context 512 (claims.sh, claim 10): small models trained to retrieve from the context
# (in these 3,000 steps on a CPU they do not: RESULTS.md, claim 10).
#   python prepare_data.py --dataset needle
#   python train.py presets/needle.py --ffn=swiglu --seed=1 --out_dir=runs/needle-swiglu-s1
#   python train.py presets/needle.py --ffn=stem --stem_layers=half --seed=1 --out_dir=runs/needle-stem-half-s1
#   python claims.py --mode needle --ckpt=runs/needle-stem-half-s1 --ckpt_swiglu=runs/needle-swiglu-s1
# Copying from the context (induction heads) appears suddenly, after many steps of a high learning rate:
# hence many small steps and a mild decay.
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

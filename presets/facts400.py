# The facts world with 400 entities (harder than the default 100), for the quality runs of claims.sh:
#   python prepare_data.py --entities 400 --out_dir data/facts400
#   python train.py presets/facts400.py --stem_layers=third --seed=1 --out_dir=runs/facts400-stem-third-s1
data_dir = "data/facts400"
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512
block_size = 128
batch_size = 32
max_iters = 400
eval_interval = 100
eval_iters = 10
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
table_optimizer = "dense"

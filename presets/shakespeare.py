# Tiny Shakespeare with GPT-2's BPE (vocab 50,257), for the quality runs of claims.sh:
#   python prepare_data.py --dataset shakespeare --tokenizer gpt2 --out_dir data/shakespeare-gpt2
#   python train.py presets/shakespeare.py --ffn=swiglu --seed=1 --out_dir=runs/shakespeare-swiglu-s1
data_dir = "data/shakespeare-gpt2"
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512
block_size = 128
batch_size = 8
max_iters = 200
eval_interval = 50
eval_iters = 10
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
table_optimizer = "lazy"  # dense AdamW would sweep all 50,257 rows a step, more than the model costs

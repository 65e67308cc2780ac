# A real run on one GPU: GPT-2-small's shape (12 layers, d 768, 12 heads, context 1024; SwiGLU
# width 2048 = 2/3 of GPT-2's 3072, so the dense FFN costs what GPT-2's does) with GPT-2's tokenizer
# and STEM in the paper's third of the layers (1, 4, 7, 10).
# python prepare_data.py --dataset=text --input=YOUR_CORPUS --tokenizer=gpt2 --out_dir=data/corpus
# python train.py presets/gpt2_small_stem.py                  # tables on the GPU
# python train.py presets/gpt2_small_stem.py --offload=True   # tables in host memory
# python train.py presets/gpt2_small_stem.py --ffn=swiglu --out_dir=out/gpt2-small-swiglu   # the dense twin
# The README's "Train a real model on one GPU" gives memory and an hour estimate.
data_dir = "data/corpus"
out_dir = "out/gpt2-small-stem"
n_layer = 12
n_head = 12
n_embd = 768
ffn_hidden = 2048
block_size = 1024
ffn = "stem"
stem_layers = "third"
batch_size = 16  # 16 x 1024 tokens per micro-batch fits an 80 GB GPU in bf16 (lower it on smaller GPUs)
grad_accum = 32  # 16 x 1024 x 32 = 524,288 tokens per step, GPT-2's batch
max_iters = 5000  # 2.6B tokens: about 20 per backbone parameter (Chinchilla), 4 per table parameter
eval_interval = 250
eval_iters = 50
log_interval = 10
learning_rate = 6e-4  # GPT-3 small's
min_lr = 6e-5
warmup_iters = 200
weight_decay = 0.1
# lazy: only the rows of a step's tokens move (the paper's dense AdamW sweeps all 4 x 50,257 rows
# each step; pass --table_optimizer=dense for it). Lazy is what --offload runs.
table_optimizer = "lazy"
eval_facts = False
keep_best = True

# A real run on one GPU: GPT-2-small's shape, GPT-2's tokenizer, STEM in the paper's third of the layers
# (1, 4, 7, 10). SwiGLU width 2048 = 2/3 of GPT-2's 3072, so a dense FFN costs what GPT-2's does.
#   python train.py presets/gpt2_small_stem.py [--offload=True]       # README, "Train a real model on one GPU"
#   python train.py presets/gpt2_small_stem.py --ffn=swiglu --out_dir=out/gpt2-small-swiglu   # the dense twin
data_dir = "data/corpus"
out_dir = "out/gpt2-small-stem"
n_layer = 12
n_head = 12
n_embd = 768
ffn_hidden = 2048
block_size = 1024
ffn = "stem"
stem_layers = "third"
batch_size = 16  # 16 x 1024 tokens per micro-batch should fit an 80 GB GPU in bf16 (estimate; lower it on smaller GPUs)
grad_accum = 32  # 16 x 1024 x 32 = 524,288 tokens per step, GPT-2's batch
max_iters = 5000  # 2.6B tokens: about 20 per backbone parameter (Chinchilla), 4 per table parameter
eval_interval = 250
eval_iters = 50
log_interval = 10
learning_rate = 6e-4  # GPT-3 small's
min_lr = 6e-5
warmup_iters = 200
table_optimizer = "lazy"  # only the rows of a step's tokens move: what --offload runs (dense: the paper's)
eval_facts = False
keep_best = True

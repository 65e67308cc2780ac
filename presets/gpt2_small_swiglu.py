# The SwiGLU twin of presets/gpt2_small_stem.py: the same shape, data, batch and schedule, every
# FFN dense (stem_layers and table_optimizer have no effect).
# python train.py presets/gpt2_small_swiglu.py
data_dir = "data/corpus"
out_dir = "out/gpt2-small-swiglu"
n_layer = 12
n_head = 12
n_embd = 768
ffn_hidden = 2048
block_size = 1024
ffn = "swiglu"
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
table_optimizer = "lazy"
eval_facts = False
keep_best = True

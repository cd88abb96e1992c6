# SPIN on a small Llama-family chat model (SmolLM2-135M/360M-Instruct, Qwen2.5-0.5B-Instruct, ...).
#   python train.py config/smollm.py --init_from=/path/to/SmolLM2-360M-Instruct --train_data=/path/to/chat.jsonl
#   python train.py config/smollm.py --init_from=$(python bench/real_model.py) --train_data=...   # SmolLM2-135M
#   torchrun --standalone --nproc_per_node=8 train.py config/smollm.py --init_from=... --train_data=...
# Needs: the model directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) on disk;
# one 24 GB GPU for 135M-360M, 40 GB+ (or several GPUs) for 0.5B at these lengths.
# config/smollm_demo.py is this recipe cut to a few minutes on a CPU.
out_dir = "out-smollm"
init_from = "SmolLM2-360M-Instruct"
tokenizer = "auto"  # the model's tokenizer.json, run by the `tokenizers` library
chat_template = "auto"  # the model's own Jinja template (ChatML, default system prompt), as transformers renders it
train_data = "data/chat.jsonl"
max_len = 1024
max_prompt_len = 512
block_size = 0  # keep the model's context

stage = "spin"
max_iterations = 3
max_epochs = 2
beta = 0.1
lr = 5e-7
optimizer = "rmsprop"  # as the paper
lr_schedule = "linear"
warmup_frac = 0.1

rollout_batch_size = 64
max_new_tokens = 256
temperature = 1.0

batch_size = 4
grad_accum = 4
compile = True  # on a GPU: compiled training forward/backward and decode step
activation_checkpointing = False  # True under FSDP trades compute for memory
eval_samples = 256
eval_interval = 250
save_interval = 250

# The SPIN paper's recipe (Chen et al. 2024, Sec. 5.1 / appendix) for zephyr-7b-sft-full on UltraChat200k.
#   torchrun --standalone --nproc_per_node=8 train.py config/zephyr_7b.py
#   (multi-node: torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...)
# Needs: 8x 80 GB GPUs (FSDP2 shards weights, gradients and optimizer state; bf16 compute);
# alignment-handbook/zephyr-7b-sft-full downloaded to a local directory; 50k UltraChat prompts as
# {"messages": [...]} JSONL (the paper samples 50k of UltraChat200k's train_sft split).
out_dir = "out-zephyr-spin"
init_from = "zephyr-7b-sft-full"  # local Hugging Face directory
tokenizer = "auto"  # the model directory's tokenizer.json (SentencePiece-style BPE, ids as Hugging Face's)
chat_template = "zephyr"  # <|user|> ... </s>: its role markers are text to Mistral's tokenizer, </s> ends a turn
train_data = "data/ultrachat_50k.jsonl"
val_data = "data/ultrachat_test.jsonl"
max_len = 1024
max_prompt_len = 512
block_size = 0  # the model's own context (32k, with its 4096-token sliding window); max_len caps the sequences

stage = "spin"
max_iterations = 4  # the paper reports iterations 0..3
max_epochs = 2  # 2 epochs per iteration
mix_previous_rollouts = 1  # iteration t trains on the generations of t-1 and t, as the official code
beta = 0.1
lr = 5e-7  # a list such as [5e-7, 5e-7, 1e-7, 1e-7] sets one value per iteration
optimizer = "rmsprop"
lr_schedule = "linear"
warmup_frac = 0.1
weight_decay = 0.0

rollout_batch_size = 64
max_new_tokens = 256
temperature = 1.0

batch_size = 8  # per GPU: 8 GPUs x 8 = global batch 64
grad_accum = 1
grad_clip = 1.0
activation_checkpointing = True
compile = True
eval_samples = 500
eval_interval = 500
save_interval = 500

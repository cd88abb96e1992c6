# SPIN on GPT-2 124M with your own chat data.
#   python train.py config/gpt2_chat.py --init_from=/path/to/gpt2 --train_data=/path/to/chat.jsonl
# Needs: a local Hugging Face GPT-2 directory (config.json + model.safetensors + tokenizer.json), e.g. an
# SFT'd GPT-2 saved with save_pretrained (use stage='sft+spin' to fine-tune a base GPT-2 first); a chat JSONL
# ({"messages": [...]}, SPIN's {"real": [...]} or NeMo's {"conversations": [...]}). One GPU with >= 16 GB;
# runs on a CPU too, slowly.
out_dir = "out-gpt2-chat"
init_from = "gpt2"  # a local directory: there is no download; point it at your copy
tokenizer = "auto"  # the model directory's tokenizer.json
# GPT-2 has no chat format of its own. ChatML's two markers become new special tokens after GPT-2's 50257 (its
# tokenizer lacks them); the model's embeddings grow by two rows, each the mean embedding, and out_dir/final holds
# the grown model with the tokenizer and template that go with it
chat_template = "chatml"
train_data = "data/chat.jsonl"
val_data = ""
max_len = 512
max_prompt_len = 256
block_size = 0  # keep the model's 1024

stage = "spin"
max_iterations = 3
max_epochs = 2
beta = 0.1
lr = 1e-6  # SPIN is sensitive to the learning rate: 1e-5 tends to collapse a small model
optimizer = "adamw"
lr_schedule = "linear"
warmup_frac = 0.1

rollout_batch_size = 64
max_new_tokens = 256
temperature = 1.0

batch_size = 8
grad_accum = 4  # 32 pairs per step on one GPU
eval_samples = 128
eval_interval = 200
save_interval = 500

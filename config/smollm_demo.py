# SPIN on a real chat model, on the CPU: bash config/smollm_demo.sh (answers before, this run, answers after), or
#   python train.py config/smollm_demo.py --init_from=$(python bench/real_model.py)
# config/smollm.py cut to minutes: the real SmolLM2-135M-Instruct (bench/real_model.py fetches and caches it) is
# fine-tuned on 27 real conversations (SFT, one epoch), then trained through one SPIN iteration on its own answers
# to the same prompts. The data: config/smollm_chat_sample*.jsonl, from NeMo-Aligner's SFT test data (README).
from config.smollm import *

out_dir = "out-smollm-demo"
train_data = "config/smollm_chat_sample.jsonl"
val_data = "config/smollm_chat_sample_val.jsonl"  # 5 held-out conversations: NLL and SPIN pairs after each phase
max_len = 192  # the sample's prompts and answers are at most 64 tokens each, plus the default system prompt
max_prompt_len = 128
device = "cpu"
compile = False

stage = "sft+spin"
sft_steps = 9  # one epoch of the 27 examples at batch 3
sft_lr = 1e-5
max_iterations = 1
max_epochs = 1
lr = 1e-6  # the paper's 5e-7 is for 7B and thousands of steps: nine steps of it would move nothing here

rollout_batch_size = 27  # every prompt's answer in one continuous batch
max_new_tokens = 64  # as long as the longest real answer
batch_size = 3
grad_accum = 1
eval_samples = 5
eval_interval = 0
save_interval = 0
keep_checkpoints = 1  # a checkpoint of this model with its optimizer state is 1.6 GB
log_interval = 1

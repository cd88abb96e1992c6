# Does SPIN improve a real chat model? SmolLM2-135M-Instruct on two-step arithmetic word problems
# (experiments/arith_task.py writes the data; its last number is checked), on the CPU:
#   python train.py config/smollm_task.py --init_from=$(python bench/real_model.py)
#   python seeds.py config/smollm_task.py --init_from=... --seeds=1,2,3      # the paired intervals over seeds
# SFT on the training problems, then 3 SPIN iterations (y' at T=1 from the opponent, beta 0.1, AdamW) against
# continued SFT for as many steps from the same SFT model; held-out accuracy at T=1 and greedy after every phase.
# Sized for a 2-core CPU (EXPERIMENTS.md says what was cut); on a GPU raise train size, epochs and eval_samples.
from config.smollm import *

out_dir = "out-smollm-task"
train_data = "experiments/arith_train.jsonl"  # 384 problems (python experiments/arith_task.py write)
val_data = "experiments/arith_val.jsonl"  # 128 held-out problems, none of them in training
checker = "final_number"
eval_samples = 64
max_len = 160  # default system prompt + question + worked answer: ~110 tokens
max_prompt_len = 96
device = "cpu"
compile = False

stage = "sft+spin"
sft_steps = 144  # three epochs of 384 problems at 8 per step: one epoch at 2e-5 left 4.7% at T=1 (EXPERIMENTS.md)
sft_lr = 5e-5
baseline_sft = True  # continued SFT from the SFT model for as many steps as SPIN: the compute-matched control
baseline_lr = 2e-5
max_iterations = 3
max_epochs = 1
beta = 0.1
lr = 1e-6
optimizer = "adamw"
prompts_per_iteration = 192  # a seeded half of the problems per iteration (the paper also draws a subset): 24 steps each

rollout_batch_size = 64
max_new_tokens = 64  # the longest real answer is ~50 tokens
batch_size = 8
grad_accum = 1
eval_interval = 0
save_interval = 12  # a long seed can be stopped and resumed
keep_checkpoints = 1
log_interval = 4

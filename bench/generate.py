"""Benchmark generate.py: tokens/s of the KV-cached sampler against an uncached recompute and against
transformers' generate on the same weights (our model saved with save_pretrained, loaded back by
transformers), greedy, for several batch sizes, all in one run on one machine.

Every repetition runs the contenders back to back, so a load change on a shared machine hits all of
them; the figures are medians over repetitions. On a GPU it also measures the batch-1 decode step
against the memory-bandwidth bound (weight + KV-cache bytes read per token / measured copy bandwidth).

python bench/generate.py [--batch_sizes=[1,16,64]] [--reps=3] [--n_layer=4] [--n_embd=256] ...
"""

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator  # noqa: E402
from generate import generate, generate_ref  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64])
    new_tokens: int = 128
    prompt_len: int = 32
    reps: int = 3
    n_layer: int = 4  # the model compared with transformers: GPT-2 shaped
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 50257
    uncached_batch_sizes: list[int] | None = None  # None: [1] on the CPU (it is quadratic), all on a GPU
    gpu: bool = True  # run the GPU part when CUDA is available
    gpu_bound_layers: int = 36  # batch-1 bandwidth check on a larger model (GPT-2 large shaped) ...
    gpu_bound_embd: int = 1280  # ... where weight reads, not kernel launches, should dominate a step
    gpu_bound_heads: int = 20
    seed: int = 0
    threads: int = 0  # CPU threads; 0 = torch's default (1 avoids thread-barrier stalls on a busy shared machine)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def make_model(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, n_layer: int, n_embd: int,
               n_head: int) -> GPT:
    torch.manual_seed(cfg.seed)
    block = cfg.prompt_len + cfg.new_tokens
    model = GPT(GPTConfig(model_type="gpt2", vocab_size=cfg.vocab_size, block_size=block, n_layer=n_layer,
                          n_head=n_head, n_kv_head=n_head, n_embd=n_embd))
    return model.to(device, dtype).eval()


def hf_copy(model: GPT, device: torch.device, dtype: torch.dtype):
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    return hf.to(device).eval()


def hf_generate(hf, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def compare(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, compile: bool) -> None:
    """tokens/s of ours, uncached recompute and transformers, per batch size; medians of cfg.reps."""
    model = make_model(cfg, device, dtype, cfg.n_layer, cfg.n_embd, cfg.n_head)
    hf = hf_copy(model, device, dtype)
    uncached_sizes = cfg.uncached_batch_sizes
    if uncached_sizes is None:
        uncached_sizes = [1] if device.type == "cpu" else cfg.batch_sizes
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 shaped, {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size} "
          f"({n_params / 1e6:.1f}M params), {dtype}; prompt {cfg.prompt_len} tokens, {cfg.new_tokens} new, "
          f"greedy; ours compile={compile}; medians of {cfg.reps} reps")
    print(f"{'batch':>5} {'ours tok/s':>11} {'uncached':>9} {'transformers':>13} {'ours/hf':>8} {'ours/uncached':>14}"
          f"   ours/hf per rep")
    g = torch.Generator().manual_seed(cfg.seed)
    for B in cfg.batch_sizes:
        prompts = torch.randint(0, cfg.vocab_size, (B, cfg.prompt_len), generator=g)
        prompt_lists = prompts.tolist()
        prompts = prompts.to(device)
        # warm-up: allocator, kernels, compile (excluded from the timings)
        ours = generate(model, prompt_lists, cfg.new_tokens, temperature=0, compile=compile)
        theirs = hf_generate(hf, prompts[:, :], cfg.new_tokens)
        same = sum(a == b for a, b in zip(ours, theirs))
        times = {"ours": [], "uncached": [], "hf": []}
        for _ in range(cfg.reps):
            times["ours"].append(timed(lambda: generate(model, prompt_lists, cfg.new_tokens, temperature=0,
                                                        compile=compile), device)[0])
            if B in uncached_sizes:
                times["uncached"].append(timed(lambda: generate_ref(model, prompt_lists, cfg.new_tokens), device)[0])
            times["hf"].append(timed(lambda: hf_generate(hf, prompts, cfg.new_tokens), device)[0])
        tokens = B * cfg.new_tokens
        rate = {k: tokens / statistics.median(v) if v else None for k, v in times.items()}
        per_rep = " ".join(f"{h / o:.2f}" for o, h in zip(times["ours"], times["hf"]))
        unc = f"{rate['uncached']:9.0f}" if rate["uncached"] else f"{'skipped':>9}"
        ratio_unc = f"{rate['ours'] / rate['uncached']:14.1f}" if rate["uncached"] else f"{'-':>14}"
        print(f"{B:5d} {rate['ours']:11.0f} {unc} {rate['hf']:13.0f} {rate['ours'] / rate['hf']:8.2f} {ratio_unc}"
              f"   [{per_rep}]  (greedy rows equal to transformers: {same}/{B})", flush=True)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device)[0] for _ in range(10)]
    return 2 * nbytes / statistics.median(times)


def bandwidth_bound(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Batch-1 decode time per token against (weights + live KV cache bytes) / copy bandwidth."""
    model = make_model(cfg, device, dtype, cfg.gpu_bound_layers, cfg.gpu_bound_embd, cfg.gpu_bound_heads)
    bandwidth = copy_bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mean_context = cfg.prompt_len + cfg.new_tokens / 2
    cache_bytes = 2 * cfg.gpu_bound_layers * cfg.gpu_bound_embd * mean_context * model.lm_head.weight.element_size()
    bound_s = (weight_bytes + cache_bytes) / bandwidth
    prompt = [list(range(1, cfg.prompt_len + 1))]
    for compile in (False, True):
        generate(model, prompt, cfg.new_tokens, temperature=0, compile=compile)  # warm-up / compile
        # decode time per token = (time for N new tokens - time for 1 new token) / (N - 1): no prefill
        one = statistics.median(timed(lambda: generate(model, prompt, 1, temperature=0, compile=compile),
                                      device)[0] for _ in range(cfg.reps))
        full = statistics.median(timed(lambda: generate(model, prompt, cfg.new_tokens, temperature=0,
                                                        compile=compile), device)[0] for _ in range(cfg.reps))
        step_s = (full - one) / (cfg.new_tokens - 1)
        print(f"batch-1 decode, {cfg.gpu_bound_layers} layers x {cfg.gpu_bound_embd} ({weight_bytes / 1e6:.0f} MB "
              f"weights), compile={compile}: {step_s * 1e6:.0f} us/token; bound {bound_s * 1e6:.0f} us "
              f"at {bandwidth / 1e9:.0f} GB/s copy bandwidth -> {bound_s / step_s:.0%} of the bound")


def main(argv: list[str]) -> None:
    cfg = configurator.load_config(BenchConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("== CPU (fp32)")
    compare(cfg, torch.device("cpu"), torch.float32, compile=False)
    if not (cfg.gpu and torch.cuda.is_available()):
        print("== GPU: skipped (CUDA is not available)")
        return
    device = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    print(f"== GPU: {torch.cuda.get_device_name()} ({dtype})")
    compare(cfg, device, dtype, compile=True)
    bandwidth_bound(cfg, device, dtype)


if __name__ == "__main__":
    configurator.run_main(main, sys.argv[1:])

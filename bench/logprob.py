"""Benchmark: token_logprobs (spin_kernels/logprob.py) against the naive path, forward + backward.

GPU, bf16: peak extra memory = torch.cuda.max_memory_allocated() minus what the inputs hold, and
the median time of 10 runs timed with CUDA events. CPU, fp32: peak resident memory (ru_maxrss) of
a fresh process per method and run, minus that process's resident memory once its inputs exist.
The upstream gradient is random per token, as in SPIN. Goals: peak extra memory <= 25% of naive
(GPU and CPU), time <= 1.1x naive on the GPU.
Run from the repo root: python bench/logprob.py [--cpu] [--gpu] [--case=N,C,V ...]   (default: both; --case
replaces the GPU cases with (tokens, hidden size, vocabulary) triples, e.g. SmolLM2-135M's --case=16384,576,49152)
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from spin_kernels.logprob import token_logprobs, token_logprobs_ref, uses_triton

GPU_CASES = [(8192, 768, 50304), (16384, 2048, 128256)]  # (N tokens, C, V)
CPU_CASE = (4096, 256, 32000)
CPU_RUNS = 3
METHODS = {"naive": token_logprobs_ref, "chunked": token_logprobs}


def make_inputs(n_tokens: int, n_embd: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n_tokens, n_embd, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, n_embd, device=device, dtype=dtype, generator=gen) * n_embd**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
    upstream = torch.rand(n_tokens, device=device, generator=gen)  # per-token weights, as SPIN's loss gives
    return hidden, weight, targets, upstream


def forward_backward(method, hidden, weight, targets, upstream) -> torch.Tensor:
    hidden.grad = weight.grad = None
    logp = method(hidden, weight, targets)
    (logp.float() * upstream).sum().backward()
    return logp.detach()


# ----------------------------------------------------------------------------- GPU

def gpu_case(n_tokens: int, n_embd: int, vocab: int) -> None:
    inputs = make_inputs(n_tokens, n_embd, vocab, torch.bfloat16, "cuda")
    stats = {}
    for name, method in METHODS.items():
        forward_backward(method, *inputs)  # warm-up: Triton compile, cuBLAS heuristics
        torch.cuda.synchronize()
        inputs[0].grad = inputs[1].grad = None
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logp = forward_backward(method, *inputs)
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - baseline
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward_backward(method, *inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        with torch.no_grad():  # rollout-time use: forward only
            fwd_times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                method(*inputs[:3])
                end.record()
                torch.cuda.synchronize()
                fwd_times.append(start.elapsed_time(end))
        stats[name] = dict(mem=peak_extra, ms=statistics.median(times), fwd_ms=statistics.median(fwd_times), logp=logp)
        inputs[0].grad = inputs[1].grad = None
    naive, chunked = stats["naive"], stats["chunked"]
    max_diff = (naive["logp"] - chunked["logp"]).abs().max().item()
    mem_ratio, time_ratio = chunked["mem"] / naive["mem"], chunked["ms"] / naive["ms"]
    print(f"GPU bf16 N={n_tokens} C={n_embd} V={vocab} (triton: {uses_triton(inputs[0])}, max |logp diff| {max_diff:.2e})")
    for name, s in stats.items():
        print(f"  {name:8s} peak extra {s['mem'] / 2**30:7.3f} GiB   fwd+bwd {s['ms']:8.2f} ms   fwd no-grad {s['fwd_ms']:8.2f} ms")
    print(f"  ratios: memory {mem_ratio:.3f} (goal <= 0.25: {'ok' if mem_ratio <= 0.25 else 'MISSED'})   "
          f"time {time_ratio:.3f} (goal <= 1.1: {'ok' if time_ratio <= 1.1 else 'MISSED'})   "
          f"fwd no-grad time {chunked['fwd_ms'] / naive['fwd_ms']:.3f}")


def gpu_part(cases: list[tuple[int, int, int]]) -> None:
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device (torch.cuda.is_available() is False)")
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for case in cases:
        gpu_case(*case)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- CPU (one process per measurement)

def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_worker(name: str) -> None:
    torch.manual_seed(0)
    inputs = make_inputs(*CPU_CASE, torch.float32, "cpu")
    baseline = max_rss_bytes()
    start = time.perf_counter()
    logp = forward_backward(METHODS[name], *inputs)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(peak_extra=max_rss_bytes() - baseline, seconds=seconds, logp_sum=logp.double().sum().item())))


def cpu_part() -> None:
    env = dict(os.environ, TRITON_INTERPRET="0")  # the plain-PyTorch chunked path, as on a CPU-only machine
    runs = {name: [] for name in METHODS}
    for _ in range(CPU_RUNS):
        for name in METHODS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-worker", name],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    n, c, v = CPU_CASE
    print(f"CPU fp32 N={n} C={c} V={v}, {torch.get_num_threads()} threads, median of {CPU_RUNS} runs, one process each")
    medians = {}
    for name, results in runs.items():
        mem = statistics.median(r["peak_extra"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        medians[name] = (mem, seconds)
        each_run = ", ".join(f"{r['peak_extra'] / 2**20:.0f}" for r in results)
        print(f"  {name:8s} peak extra RSS {mem / 2**20:8.1f} MiB   fwd+bwd {seconds:6.2f} s   (runs: {each_run} MiB)")
    print(f"  sum logp: naive {runs['naive'][0]['logp_sum']:.4f}  chunked {runs['chunked'][0]['logp_sum']:.4f}")
    mem_ratio = medians["chunked"][0] / medians["naive"][0]
    print(f"  ratios: memory {mem_ratio:.3f} (goal <= 0.25: {'ok' if mem_ratio <= 0.25 else 'MISSED'})   "
          f"time {medians['chunked'][1] / medians['naive'][1]:.3f} (no CPU time goal)")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--cpu-worker"]:
        cpu_worker(args[1])
    else:
        cases = [a.split("=", 1)[1] for a in args if a.startswith("--case=")]
        bad = [c for c in cases if len(c.split(",")) != 3 or not all(x.isdigit() and int(x) > 0 for x in c.split(","))]
        if bad:
            sys.exit(f"--case={bad[0]}: give three positive integers N,C,V (tokens, hidden size, vocabulary)")
        if not args or "--gpu" in args:
            gpu_part([tuple(int(x) for x in c.split(",")) for c in cases] or GPU_CASES)
        if not args or "--cpu" in args:
            cpu_part()

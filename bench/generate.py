"""Benchmark generate.py against transformers' generate on the same weights (our model saved with
save_pretrained, loaded back by transformers), greedy, so every method produces the same tokens.

Three parts, all in one run on one machine:
- step: the decode step (and tokens/s of a whole call) at several batch sizes, ours against transformers
  and, at batch 1 on the CPU, an uncached recompute (generate_ref); identical greedy tokens are checked.
- profile: where our decode step's time goes, per operator (torch.profiler; a call of N new tokens minus
  a call of 1, divided by N - 1, so the prefill drops out).
- long tail: prompts whose answers end at lengths drawn from a long-tailed law (Pareto, 8 to 256 tokens),
  forced the same way on every side (a per-prompt max_new_tokens for us, a per-row stopping criterion for
  transformers); tokens/s of continuous batching against static batches of the same size and against
  transformers' generate on those static batches.
- matmul floor (--model runs): the decode step's weight matmuls alone (every nn.Linear of the model on a
  (batch, in_features) input, the LM head included), timed the same way: what no sampler on these weights beats.
By default the model is a random GPT-2-shaped toy; --model=fixture (SmolLM2-135M-Instruct, bench/real_model.py) or
--model=DIR loads a real Hugging Face directory on both sides (ours through checkpoint.load_pretrained, transformers
through from_pretrained) and its prompts are the last prompt_len tokens of the chat prompts of --data (default
shared/bench/smollm_workload.jsonl), each ending in the assistant header, so the greedy answers are real answers.
Repetitions interleave the methods, so a load change on a shared machine hits all of them; figures are
medians, and on the CPU the time is the process's CPU time (one thread), which other jobs inflate far less
than wall time. On a GPU (--gpu, bf16, ours with compile=True: CUDA graphs) the step and long-tail parts run
again, and the batch-1 decode step is set against the memory-bandwidth bound (weight + KV-cache bytes read
per token / measured copy bandwidth).

python bench/generate.py [--model=fixture|DIR] [--batch_sizes=[1,16,64]] [--reps=3]
                         [--parts="['step','profile','long_tail']"] [--gpu=True] ...
"""

import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import configurator  # noqa: E402
from checkpoint import load_pretrained, save_model_dir  # noqa: E402
from configurator import UserError  # noqa: E402
from generate import GREEDY, generate, generate_ref  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@dataclass
class BenchConfig:
    model: str = ""  # '' = the random toy below; 'fixture' (SmolLM2-135M-Instruct) or a Hugging Face model directory
    data: str = ""  # the real model's prompts (chat JSONL); '' = shared/bench/smollm_workload.jsonl
    parts: list[str] = field(default_factory=lambda: ["step", "profile", "long_tail"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64])
    new_tokens: int = 64
    prompt_len: int = 32
    reps: int = 3
    n_layer: int = 4  # the model compared with transformers: GPT-2 shaped
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 4096
    profile_batch: int = 16
    long_tail_prompts: int = 64  # the long-tailed workload: this many prompts ...
    long_tail_batch: int = 16  # ... through this many cache rows (and static batches of this size)
    long_tail_min: int = 8  # answer lengths: Pareto(alpha=1) from long_tail_min, cut at long_tail_max
    long_tail_max: int = 256
    cpu: bool = True  # run the CPU part
    gpu: bool = True  # run the GPU part when CUDA is available
    gpu_long_tail_prompts: int = 512
    gpu_long_tail_batch: int = 64
    gpu_bound_layers: int = 36  # batch-1 bandwidth check on a larger model (GPT-2 large shaped) ...
    gpu_bound_embd: int = 1280  # ... where weight reads, not kernel launches, should dominate a step
    gpu_bound_heads: int = 20
    seed: int = 0
    threads: int = 1  # CPU threads (1: comparable figures on a shared machine); 0 = torch's default
    cpu_compile: bool = False  # the CPU step part again with ours compiled (inductor's C++ kernels; needs a compiler)


# ----------------------------------------------------------------------------------------------
# timing and the contenders


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result): CPU time of this process on the CPU, wall time (synchronised) on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def make_model(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, n_layer: int, n_embd: int,
               n_head: int, block_size: int) -> GPT:
    if cfg.model:
        return load_pretrained(cfg.model, dtype=dtype).to(device).eval()
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(model_type="gpt2", vocab_size=cfg.vocab_size, block_size=block_size, n_layer=n_layer,
                          n_head=n_head, n_kv_head=n_head, n_embd=n_embd))
    return model.to(device, dtype).eval()


def hf_copy(cfg: BenchConfig, model: GPT, device: torch.device, dtype: torch.dtype):
    """transformers' model on the same weights: the real directory itself, or our toy saved and read back."""
    import transformers

    transformers.logging.set_verbosity_error()
    if cfg.model:
        return transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(d, model.state_dict(), model.config)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    return hf.to(device).eval()


def hf_generate(hf, prompts: torch.Tensor, new_tokens: int | list[int]) -> list[list[int]]:
    """transformers' greedy generate; a list of new_tokens ends each row at its own length (a per-row
    stopping criterion: the row is done, the batch runs until its last row is, as with EOS)."""
    import transformers

    class RowLengths(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - prompts.shape[1]) >= lengths

    lengths = torch.tensor(new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts),
                           device=prompts.device)
    longest = int(lengths.max())
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=longest,
                          min_new_tokens=None, eos_token_id=None, pad_token_id=0,
                          stopping_criteria=transformers.StoppingCriteriaList([RowLengths()]))
    return [row[:n] for row, n in zip(out[:, prompts.shape[1]:].tolist(), lengths.tolist())]


def random_prompts(cfg: BenchConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, prompt_len) prompts: random ids on the toy; the real model's chat prompts (cycled, in an order drawn
    from the generator), each cut to its last prompt_len tokens."""
    if not cfg.model:
        return torch.randint(0, cfg.vocab_size, (n, cfg.prompt_len), generator=generator)
    prompts = real_prompts(cfg)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    return torch.tensor([prompts[order[i % len(order)]][-cfg.prompt_len:] for i in range(n)])


def real_prompts(cfg: BenchConfig) -> list[list[int]]:
    """The chat prompts of cfg.data in the model's own tokenizer and chat template, as train.py reads them."""
    import checkpoint as ckpt
    from data import load_examples
    from tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model)
    template = ckpt.chat_template_for("auto", cfg.model, tok)
    examples, _ = load_examples(cfg.data, tok, template, 4096, 4096)
    short = [len(e.prompt_ids) for e in examples if len(e.prompt_ids) < cfg.prompt_len]
    if short:
        raise UserError(f"--prompt_len={cfg.prompt_len}: {len(short)} prompts of {cfg.data} are shorter "
                        f"(shortest {min(short)} tokens); lower --prompt_len")
    return [e.prompt_ids for e in examples]


def model_name(cfg: BenchConfig) -> str:
    if cfg.model:
        return os.path.basename(os.path.normpath(cfg.model))
    return f"GPT-2 shaped {cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}"


def resolve_model(cfg: BenchConfig) -> None:
    """--model=fixture -> bench/real_model.py's directory; a real model's default data file."""
    if cfg.model == "fixture":
        spec = importlib.util.spec_from_file_location("real_model", os.path.join(REPO, "bench", "real_model.py"))
        real_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(real_model)
        try:
            cfg.model = real_model.smollm2_dir()
        except RuntimeError as e:
            raise UserError(f"--model=fixture: {e}; or pass --model=DIR (a Hugging Face model directory)") from None
    if cfg.model and not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise UserError(f"--model={cfg.model!r} has no config.json; give a Hugging Face model directory")
    if cfg.model and not cfg.data:
        cfg.data = os.path.join(os.path.dirname(REPO), "shared", "bench", "smollm_workload.jsonl")


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------------------------
# the parts


def step_part(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, compile: bool) -> None:
    """Decode step and whole-call tokens/s at each batch size: ours, transformers, (uncached)."""
    model = make_model(cfg, device, dtype, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.prompt_len + cfg.new_tokens)
    hf = hf_copy(cfg, model, device, dtype)
    N = cfg.new_tokens
    print(f"-- decode step: {model_name(cfg)}, {dtype}; prompt "
          f"{cfg.prompt_len} tokens, {N} new, greedy; ours compile={compile}; medians of {cfg.reps} reps; "
          f"step = (call of {N} new - call of 1) / {N - 1}")
    print(f"{'batch':>5} {'ours step ms':>12} {'hf step ms':>10} {'hf/ours':>7} {'floor ms':>8} {'floor/ours':>10} | "
          f"{'ours tok/s':>10} {'hf tok/s':>9} {'ours/hf':>7} {'uncached':>9} | ours/hf tok/s per rep, "
          f"greedy rows equal")
    g = torch.Generator().manual_seed(cfg.seed)
    for B in cfg.batch_sizes:
        prompts = random_prompts(cfg, B, g).to(device)
        prompt_lists = prompts.tolist()
        runs = {"ours": lambda n: generate(model, prompt_lists, n, sampling=GREEDY, compile=compile),
                "hf": lambda n: hf_generate(hf, prompts, n)}
        ours, theirs = runs["ours"](N), runs["hf"](N)  # warm-up (compile), and the tokens compared
        same = sum(a == b for a, b in zip(ours, theirs))
        if cfg.model and same != B:  # the real weights are the same file on both sides: greedy must agree
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            raise AssertionError(f"batch {B}: greedy tokens differ from transformers' in {B - same} rows (row "
                                 f"{first}: ours {ours[first][:12]}..., transformers {theirs[first][:12]}...)")
        floor = matmul_floor_ms(model, B, device, cfg.reps)
        times = {(name, n): [] for name in runs for n in (1, N)}
        uncached = []
        for _ in range(cfg.reps):
            for name, run in runs.items():
                for n in (N, 1):
                    times[name, n].append(timed(lambda: run(n), device)[0])
            if B == 1 and device.type == "cpu":
                uncached.append(timed(lambda: generate_ref(model, prompt_lists, N), device)[0])
        step = {name: (median_ms(times[name, N]) - median_ms(times[name, 1])) / (N - 1) for name in runs}
        rate = {name: B * N / statistics.median(times[name, N]) for name in runs}
        per_rep = " ".join(f"{h / o:.2f}" for o, h in zip(times["ours", N], times["hf", N]))
        unc = f"{B * N / statistics.median(uncached):9.0f}" if uncached else f"{'-':>9}"
        print(f"{B:5d} {step['ours']:12.3f} {step['hf']:10.3f} {step['hf'] / step['ours']:7.2f} {floor:8.3f} "
              f"{floor / step['ours']:10.2f} | "
              f"{rate['ours']:10.0f} {rate['hf']:9.0f} {rate['ours'] / rate['hf']:7.2f} {unc} | [{per_rep}] {same}/{B}",
              flush=True)


def matmul_floor_ms(model: GPT, batch: int, device: torch.device, reps: int) -> float:
    """ms of one decode step's weight matmuls alone: every nn.Linear once on a (batch, in_features) input (the LM
    head on the last position only, as the step runs it), no attention, norms, cache or sampling; median of reps,
    each the mean of 10 passes."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(0)
    dtype = linears[0].weight.dtype
    inputs = [torch.randn(batch, m.in_features, generator=g).to(device, dtype) for m in linears]

    def passes(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                for m, x in zip(linears, inputs):
                    torch.nn.functional.linear(x, m.weight, m.bias)

    passes(1)
    return median_ms([timed(lambda: passes(10), device)[0] / 10 for _ in range(reps)])


# the step's parts, each a function the profile wraps in a labelled range: (label, module, attribute)
STEP_PARTS = (("matmuls (nn.Linear)", torch.nn.Linear, "forward"),
              ("attention (model.attend)", "model", "attend"),
              ("KV-cache writes (KVCache.update)", "model.KVCache", "update"),
              ("mask building (generate.attention_mask)", "generate", "attention_mask"),
              ("sampling (generate.sample_next)", "generate", "sample_next"))


@contextlib.contextmanager
def labelled_parts():
    """Wrap each of STEP_PARTS in torch.profiler.record_function(label) while profiling, so a part's
    inclusive time (its operators, their Python glue) is read from its label."""
    import importlib

    from torch.profiler import record_function

    def owner_of(where):
        if not isinstance(where, str):
            return where
        module, _, cls = where.partition(".")
        owner = importlib.import_module(module)
        return getattr(owner, cls) if cls else owner

    saved = []
    for label, where, name in STEP_PARTS:
        owner = owner_of(where)
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _label=label, **kwargs):
            with record_function(_label):
                return _original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def profile_part(cfg: BenchConfig) -> None:
    """Split of our CPU decode step at cfg.profile_batch into its parts (STEP_PARTS, each part's inclusive
    profiler time) and the rest (norms, GELU, embeddings, residual adds, the loop's bookkeeping, Python).
    Profiler times are inflated by its per-operator cost and by load: read the shares, and the step's CPU
    time from the step part."""
    from torch.profiler import ProfilerActivity, profile

    model = make_model(cfg, torch.device("cpu"), torch.float32, cfg.n_layer, cfg.n_embd, cfg.n_head,
                       cfg.prompt_len + cfg.new_tokens)
    prompts = random_prompts(cfg, cfg.profile_batch, torch.Generator().manual_seed(cfg.seed)).tolist()
    N = cfg.new_tokens
    labels = [label for label, _, _ in STEP_PARTS]

    def part_times(n: int) -> dict[str, float]:
        """Inclusive time per part in a call of n new tokens (us), plus the call's wall time, and self time
        per operator outside the parts."""
        with labelled_parts(), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            generate(model, prompts, n, sampling=GREEDY)
            wall = (time.perf_counter() - t0) * 1e6
        events = prof.events()
        times = {label: 0.0 for label in labels}
        for e in events:
            if e.name in times:
                times[e.name] += e.cpu_time_total

        def in_part(e) -> bool:
            while e is not None:
                if e.name in times:
                    return True
                e = e.cpu_parent
            return False

        for e in events:
            if e.name not in times and not in_part(e):
                times["op " + e.name] = times.get("op " + e.name, 0.0) + e.self_cpu_time_total
        return {**times, "(call)": wall}

    generate(model, prompts, N, sampling=GREEDY)  # warm-up
    per_step: dict[str, list[float]] = {}
    for _ in range(cfg.reps):
        full, one = part_times(N), part_times(1)
        for key in full.keys() | one.keys():
            per_step.setdefault(key, []).append((full.get(key, 0.0) - one.get(key, 0.0)) / (N - 1) / 1e3)
    ms = {key: statistics.median(v) for key, v in per_step.items()}
    wall = ms.pop("(call)")
    print(f"-- profile of our decode step, batch {cfg.profile_batch}, greedy (profiler wall time, medians of "
          f"{cfg.reps}): {wall:.3f} ms per step")
    rest = wall
    for label in labels:
        rest -= ms[label]
        print(f"   {label:<42} {ms[label]:7.3f} ms  {ms[label] / wall:5.1%}")
    print(f"   {'the rest (model ops, loop, Python)':<42} {rest:7.3f} ms  {rest / wall:5.1%}; its largest operators:")
    others = sorted(((v, key[3:]) for key, v in ms.items() if key.startswith("op ")), reverse=True)
    for v, op in others[:8]:
        print(f"      {op:<45} {v:7.3f} ms")


def long_tail_lengths(cfg: BenchConfig, n: int) -> list[int]:
    """Pareto(alpha=1) answer lengths: P(length > x) = long_tail_min / x, cut at long_tail_max."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(cfg.seed + 1), dtype=torch.float64)
    return (cfg.long_tail_min / u).floor().clamp(max=cfg.long_tail_max).long().tolist()


def long_tail_part(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, compile: bool, n_prompts: int,
                   batch: int) -> None:
    """tokens/s on the long-tailed workload: continuous batching, static batches, transformers. Compiled, every
    call gets the same cache (max_len), so one captured step serves them all."""
    model = make_model(cfg, device, dtype, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.prompt_len + cfg.long_tail_max)
    hf = hf_copy(cfg, model, device, dtype)
    prompts = random_prompts(cfg, n_prompts, torch.Generator().manual_seed(cfg.seed + 2)).to(device)
    prompt_lists = prompts.tolist()
    lengths = long_tail_lengths(cfg, n_prompts)
    chunks = [slice(i, i + batch) for i in range(0, n_prompts, batch)]
    max_len = cfg.prompt_len + cfg.long_tail_max if compile else None

    def static(chunk_run) -> list[list[int]]:
        return [row for c in chunks for row in chunk_run(c)]

    runs = {
        "continuous": lambda: generate(model, prompt_lists, lengths, sampling=GREEDY, batch_size=batch,
                                       max_len=max_len, compile=compile),
        "static": lambda: static(lambda c: generate(model, prompt_lists[c], lengths[c], sampling=GREEDY,
                                                    max_len=max_len, compile=compile)),
        "transformers": lambda: static(lambda c: hf_generate(hf, prompts[c], lengths[c])),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the tokens compared
    same = sum(a == b == c for a, b, c in zip(*outputs.values()))
    tokens = sum(lengths)
    static_steps = sum(max(lengths[c]) for c in chunks)
    times = {name: [] for name in runs}
    for _ in range(cfg.reps):
        for name, run in runs.items():
            times[name].append(timed(run, device)[0])
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"-- long tail: {n_prompts} prompts of {cfg.prompt_len} tokens, answers of {tokens} tokens in all "
          f"(Pareto lengths {min(lengths)}..{max(lengths)}, median {statistics.median(lengths):.0f}, mean "
          f"{tokens / n_prompts:.1f}), {batch} rows; static batches need {static_steps} steps, "
          f"{tokens / (static_steps * batch):.0%} of their row-steps useful; medians of {cfg.reps} reps")
    for name in runs:
        per_rep = " ".join(f"{t:.2f}" for t in times[name])
        print(f"   {name:<13} {rate[name]:8.0f} tok/s  ({rate[name] / rate['transformers']:.2f}x transformers, "
              f"{rate[name] / rate['static']:.2f}x static)  s per rep [{per_rep}]", flush=True)
    print(f"   same tokens on all three sides: {same}/{n_prompts} prompts")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device)[0] for _ in range(10)]
    return 2 * nbytes / statistics.median(times)


def bandwidth_bound(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Batch-1 decode time per token against (weights + live KV cache bytes) / copy bandwidth."""
    model = make_model(cfg, device, dtype, cfg.gpu_bound_layers, cfg.gpu_bound_embd, cfg.gpu_bound_heads,
                       cfg.prompt_len + cfg.new_tokens)
    bandwidth = copy_bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mean_context = cfg.prompt_len + cfg.new_tokens / 2
    cache_bytes = 2 * cfg.gpu_bound_layers * cfg.gpu_bound_embd * mean_context * model.lm_head.weight.element_size()
    bound_s = (weight_bytes + cache_bytes) / bandwidth
    prompt = [list(range(1, cfg.prompt_len + 1))]
    for compile in (False, True):
        generate(model, prompt, cfg.new_tokens, sampling=GREEDY, compile=compile)  # warm-up / compile
        # decode time per token = (time for N new tokens - time for 1 new token) / (N - 1): no prefill
        one = statistics.median(timed(lambda: generate(model, prompt, 1, sampling=GREEDY, compile=compile),
                                      device)[0] for _ in range(cfg.reps))
        full = statistics.median(timed(lambda: generate(model, prompt, cfg.new_tokens, sampling=GREEDY,
                                                        compile=compile), device)[0] for _ in range(cfg.reps))
        step_s = (full - one) / (cfg.new_tokens - 1)
        print(f"batch-1 decode, {cfg.gpu_bound_layers} layers x {cfg.gpu_bound_embd} ({weight_bytes / 1e6:.0f} MB "
              f"weights), compile={compile}: {step_s * 1e6:.0f} us/token; bound {bound_s * 1e6:.0f} us "
              f"at {bandwidth / 1e9:.0f} GB/s copy bandwidth -> {bound_s / step_s:.0%} of the bound", flush=True)


def main(argv: list[str]) -> None:
    cfg = configurator.load_config(BenchConfig, argv)
    resolve_model(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}; model {cfg.model or model_name(cfg)}")
    cpu = torch.device("cpu")
    if cfg.cpu:
        print("== CPU (fp32, times are this process's CPU seconds)")
        if "step" in cfg.parts:
            step_part(cfg, cpu, torch.float32, compile=False)
            if cfg.cpu_compile:
                step_part(cfg, cpu, torch.float32, compile=True)
        if "profile" in cfg.parts:
            profile_part(cfg)
        if "long_tail" in cfg.parts:
            long_tail_part(cfg, cpu, torch.float32, False, cfg.long_tail_prompts, cfg.long_tail_batch)
    if not (cfg.gpu and torch.cuda.is_available()):
        print("== GPU: skipped (CUDA is not available)")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        return
    device = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    print(f"== GPU: {torch.cuda.get_device_name()} ({dtype}, wall times)")
    if "step" in cfg.parts:
        step_part(cfg, device, dtype, compile=True)
        bandwidth_bound(cfg, device, dtype)
    if "long_tail" in cfg.parts:
        long_tail_part(cfg, device, dtype, True, cfg.gpu_long_tail_prompts, cfg.gpu_long_tail_batch)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    configurator.run_main(main, sys.argv[1:])

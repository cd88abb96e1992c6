"""Benchmark: one SPIN iteration of nanospin against the Hugging Face way (HF generate + TRL DPOTrainer).

- Two workloads, both the peer's (shared/bench/peer_spin_iteration.py):
  - real (default, --model=fixture or a Hugging Face model directory): SmolLM2-135M-Instruct (bench/real_model.py),
    the chat records of --data (default shared/bench/smollm_workload.jsonl), 64 conversations, rollout batch 64 x 64
    new tokens at temperature 1 with EOS stopping, then 8 steps of 8 pairs (AdamW, lr 1e-6, beta 0.1), fp32; each
    side reads the model's own tokenizer and chat template.
  - toy (--model=toy): a GPT-2-shaped 4 x 256 random model, its byte-level BPE tokenizer rebuilt with `tokenizers`
    (same ids), 256 "What is A + B?" prompts, 16 new tokens, 32 steps of 8 pairs at lr 1e-4.
- Ours runs through the functions train.py calls: the model directory read as prepare_data/build_model read it,
  spin.rollout (sampling + the opponent's log-probs), then train.py's SPIN step (pair_terms, make_optimizer,
  get_lr, BatchOrder, clipping, NaN guard).
- Every run is a fresh process, ours and the peer's alternate, figures are medians; own CPU-seconds are printed
  beside wall time because on a busy shared machine 2 threads stall at barriers (--threads=1 is steadier).
- Peak memory is each run's own: the driver reaps every run with wait4, whose ru_maxrss is that process's (and its
  children's) largest resident set, imports and model loading included.
- The peer is CPU-only: with --device=cuda only ours runs (bf16 autocast, compiled, first iteration compiles).
  --dtype=bfloat16 runs ours under bf16 autocast on the CPU too (train.py's dtype=bfloat16), for comparison.

python bench/iteration.py [--model=fixture|toy|DIR] [--data=FILE.jsonl] [--reps=3] [--threads=2]
                          [--peer=auto|yes|no] [--peer_mode=functions|script] [--device=cpu] [--dtype=float32]
                          [--peer_python=/path/to/venv/bin/python]  (the peer's packages in another environment)
                          [--pack_pairs=False]  (ours unpacked: the reference path, for comparison)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import configurator  # noqa: E402
from configurator import UserError  # noqa: E402

PEER_CANDIDATES = (os.path.join(REPO, "shared", "bench", "peer_spin_iteration.py"),
                   os.path.join(os.path.dirname(REPO), "shared", "bench", "peer_spin_iteration.py"))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "bench", "smollm_workload.jsonl")
# what the peer script hard-codes (its DPOConfig, and on the toy its model and the flags we do not pass); ours
# must match for a fair comparison
PEER_FIXED = {"batch_size": 8, "epochs": 1, "beta": 0.1}
PEER_FIXED_TOY = {**PEER_FIXED, "n_layer": 4, "n_head": 8, "n_embd": 256, "block_size": 256, "lr": 1e-4, "max_len": 64}
# each workload's settings where the command line leaves them at None
WORKLOAD_DEFAULTS = {"toy": {"n": 256, "max_new_tokens": 16, "lr": 1e-4, "max_len": 64},
                     "real": {"n": 64, "max_new_tokens": 64, "lr": 1e-6, "max_len": 256}}
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass
class BenchConfig:
    model: str = "fixture"  # 'fixture' (SmolLM2-135M-Instruct, bench/real_model.py), 'toy', or a model directory
    data: str = ""  # the real workload's chat JSONL; '' = shared/bench/smollm_workload.jsonl beside the repository
    reps: int = 3  # runs of each side, alternating ours / peer
    peer: str = "auto"  # 'auto' (when trl is importable and the peer script is found) | 'yes' | 'no'
    peer_script: str = ""  # '' = shared/bench/peer_spin_iteration.py in or beside the repository
    peer_python: str = ""  # the interpreter of the peer's runs ('' = this one): one with trl and datasets
    peer_mode: str = "functions"  # 'functions': the peer's own functions, its precompute=True path only (its TOTAL);
    # 'script': the unmodified script, which also runs a precompute=False epoch (twice the time, same TOTAL)
    device: str = "cpu"  # 'cpu' | 'cuda' (ours only)
    dtype: str = "auto"  # ours' compute dtype: 'auto' (float32 on the CPU, bfloat16 on a GPU) | 'float32' | 'bfloat16'
    threads: int = 2  # OMP_NUM_THREADS of every run (the peer's 9-10 s were measured with 2)
    n: int | None = None  # chat prompts (None: 64 real, 256 toy)
    seed: int = 0
    vocab_size: int = 1024  # the toy's
    n_layer: int = 4  # the toy's shape
    n_head: int = 8
    n_embd: int = 256
    block_size: int = 256
    rollout_batch_size: int = 64
    max_new_tokens: int | None = None  # None: 64 real, 16 toy
    batch_size: int = 8  # pairs per optimizer step
    epochs: int = 1
    lr: float | None = None  # None: 1e-6 real, 1e-4 toy
    beta: float = 0.1
    max_len: int | None = None  # prompt + response tokens (the peer's DPO max_length); None: 256 real, 64 toy
    iterations: int = 0  # timed iterations per ours process; 0 = 1 on the CPU, 2 on a GPU (the first compiles)
    compile: bool | None = None  # None: True on a GPU (decode step and training), False on the CPU
    pack_pairs: bool = True  # train.py's default: one row per pair (False: the unpacked reference, a row per sequence)
    json_out: str = ""  # write every run's record here


def workload(cfg: BenchConfig) -> str:
    return "toy" if cfg.model == "toy" else "real"


def resolved(cfg: BenchConfig) -> BenchConfig:
    """cfg with its workload's defaults filled in, the fixture named by its directory and the data path."""
    filled = {k: v for k, v in WORKLOAD_DEFAULTS[workload(cfg)].items() if getattr(cfg, k) is None}
    if cfg.model == "fixture":
        spec = importlib.util.spec_from_file_location("real_model", os.path.join(REPO, "bench", "real_model.py"))
        real_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(real_model)
        try:
            filled["model"] = real_model.smollm2_dir()
        except RuntimeError as e:
            raise UserError(f"--model=fixture: {e}; or pass --model=DIR (a Hugging Face model directory)") from None
    if workload(cfg) == "real" and not cfg.data:
        filled["data"] = DEFAULT_DATA
    return dataclasses.replace(cfg, **filled)


# ----------------------------------------------------------------------------------------------
# contention probe: on a shared machine, say how much CPU other processes took during a run


def busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has been busy (user..steal, without idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------
# ours: the peer's tokenizer and data, nanospin's model and functions


def chatml_text(question: str, answer: str) -> str:
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


def peer_tokenizer(vocab_size: int, seed: int, directory: str):
    """The peer's tokenizer rebuilt: byte-level BPE trained by `tokenizers` on the same 4000 ChatML
    additions (its corpus seed is seed + 1000), saved as tokenizer.json, read back by tokenizer.load_tokenizer
    (tiktoken with the same ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tokenizer import load_tokenizer
    rng = random.Random(seed + 1000)
    corpus = []
    for _ in range(4000):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        corpus.append(chatml_text(f"What is {a} + {b}?", str(a + b)))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    bpe.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": IM_END, "pad_token": PAD}, f)
    return load_tokenizer(directory)


def addition_conversations(n: int, seed: int) -> list[list[dict]]:
    """The peer's data: 'What is A + B?' -> 'A+B' with 3-digit A, B, drawn in the same order."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        convs.append([{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}])
    return convs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compute_dtype_of(cfg: BenchConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def one_iteration(model, examples, stop: list[int], pad_id: int, cfg: BenchConfig, iteration: int,
                  device: torch.device, compile: bool) -> dict:
    """Rollout (sampling + the opponent's log-probs) then one epoch of SPIN steps, as train.py runs them."""
    import spin
    from data import BatchOrder
    from generate import Sampling, derive_seed
    from train_config import TrainConfig, get_lr, make_optimizer

    compute_dtype = compute_dtype_of(cfg, device)
    # fsdp.init_runtime's rule: fp32 master weights under autocast in a lower compute dtype
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext()
    scoring = {"seconds": 0.0}
    score_pairs = spin.pair_logps

    def timed_pair_logps(*args, **kwargs):  # splits the rollout into sampling and scoring
        sync(device)
        t0 = time.perf_counter()
        out = score_pairs(*args, **kwargs)
        sync(device)
        scoring["seconds"] += time.perf_counter() - t0
        return out

    # ---- rollout ----
    sync(device)
    cpu0, t_rollout = time.process_time(), time.perf_counter()
    # train.py's opponent: the model itself on the CPU, a plain copy in the compute dtype on a GPU
    opponent = model if device.type == "cpu" else copy.deepcopy(model).to(compute_dtype)
    opponent.eval()
    spin.pair_logps = timed_pair_logps
    try:
        settings = spin.RolloutSettings(max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len, stop=stop,
                                        pad_id=pad_id, batch_size=cfg.rollout_batch_size, seed=cfg.seed, device=device,
                                        sampling=Sampling(temperature=1.0), compile=compile, autocast=autocast,
                                        pack_pairs=cfg.pack_pairs)
        pairs = spin.rollout(opponent, examples, settings, iteration)
    finally:
        spin.pair_logps = score_pairs
    del opponent
    sync(device)
    rollout_s = time.perf_counter() - t_rollout

    # ---- train: train.py's SPIN step (global-count loss, clip, finite check, AdamW, linear schedule) ----
    tcfg = TrainConfig(lr=cfg.lr, beta2=0.999, weight_decay=0.0, warmup_frac=0.0, lr_schedule="linear",
                       grad_clip=1.0, batch_size=cfg.batch_size)
    sync(device)
    t_train = time.perf_counter()
    model.train()
    optimizer = make_optimizer(model, tcfg, cfg.lr)
    order = BatchOrder(n=len(pairs), batch_size=cfg.batch_size, seed=derive_seed(cfg.seed, "data_order", iteration))
    total_steps = cfg.epochs * order.batches_per_epoch()
    loss_sum, accuracy_sum, pair_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, total_steps, cfg.lr, tcfg)
        batch = [pairs[i] for i in order.next_batch()]
        with autocast:
            losses, metrics = spin.pair_terms(model, batch, cfg.beta, "sigmoid", pad_id, device, cfg.pack_pairs)
        (losses.sum() / len(batch)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        if step == 0:  # the exact-opponent invariant: before any update the policy is the opponent, rewards 0
            first_rewards = torch.cat([metrics["rewards/real"], metrics["rewards/generated"]]).abs()
        step_loss = metrics["loss"].sum()
        if not torch.isfinite(step_loss) or not torch.isfinite(grad_norm):  # train.py's NaN guard (a sync)
            raise RuntimeError(f"non-finite loss or gradient at step {step}")
        loss_sum += step_loss
        accuracy_sum += metrics["rewards/accuracies"].sum()
        pair_count += len(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    train_s, cpu_s = time.perf_counter() - t_train, time.process_time() - cpu0

    # spin.rollout's batches: prompts sorted by length, cut into rollout_batch_size; a batch runs until its
    # longest row is done, so it costs batch size x longest row positions
    by_length = sorted(range(len(examples)), key=lambda i: (len(examples[i].prompt_ids), i))
    positions = sum(len(group) * max(len(pairs[i].generated_ids) for i in group)
                    for group in (by_length[k:k + cfg.rollout_batch_size]
                                  for k in range(0, len(by_length), cfg.rollout_batch_size)))
    prompt_runs = 1 if cfg.pack_pairs else 2  # packed: a pair's prompt runs once (spin_micro_batch's count)
    tokens_run = cfg.epochs * sum(prompt_runs * len(p.prompt_ids) + len(p.real_ids) + len(p.generated_ids)
                                  for p in pairs)
    params = sum(p.numel() for p in model.parameters())
    return {"sampling_s": rollout_s - scoring["seconds"], "opponent_logps_s": scoring["seconds"], "train_s": train_s,
            "total_s": rollout_s + train_s, "cpu_s": cpu_s, "steps": total_steps,
            "gen_tokens": sum(len(p.generated_ids) for p in pairs), "gen_positions": positions,
            "eos_rows": sum(p.eos for p in pairs),
            "train_tokens": cfg.epochs * sum(2 * len(p.prompt_ids) + len(p.real_ids) + len(p.generated_ids)
                                             for p in pairs),
            "loss": loss_sum.item() / pair_count, "reward_accuracy": accuracy_sum.item() / pair_count,
            "train_tokens_run": tokens_run, "train_flops_per_s": 6 * params * tokens_run / train_s,
            "first_step_max_abs_reward": first_rewards.max().item(),
            "first_step_mean_abs_reward": first_rewards.mean().item()}


def toy_setup(cfg: BenchConfig):
    """(model, examples, stop ids, pad id) of the toy workload: the peer's tokenizer and data, a random GPT-2."""
    from data import examples_from_messages
    from model import GPT, GPTConfig
    from templates import stop_ids

    with tempfile.TemporaryDirectory(prefix="iteration_bench_") as directory:
        tok = peer_tokenizer(cfg.vocab_size, cfg.seed, directory)
    examples, _ = examples_from_messages(addition_conversations(cfg.n, cfg.seed), tok, "chatml", cfg.max_len,
                                         cfg.max_len - cfg.max_new_tokens)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(model_type="gpt2", vocab_size=tok.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_kv_head=cfg.n_head, n_embd=cfg.n_embd, eos_token_id=tok.eos_id))
    return model, examples, stop_ids(tok, "chatml"), tok.eos_id


def real_setup(cfg: BenchConfig):
    """(model, examples, stop ids, pad id) as train.py's prepare_data and build_model make them from a model
    directory and a chat file: its tokenizer and chat template, the first n records, the model in fp32."""
    import checkpoint as ckpt
    from data import load_examples
    from templates import missing_tokens, stop_ids
    from tokenizer import add_special_tokens, load_tokenizer

    model_dir = ckpt.resolve_model_dir(cfg.model, key="model")
    tok = load_tokenizer(model_dir)
    template = ckpt.chat_template_for("auto", model_dir, tok)
    if missing_tokens(tok, template):
        tok = add_special_tokens(tok, missing_tokens(tok, template))
    examples, _ = load_examples(cfg.data, tok, template, cfg.max_len, cfg.max_len - cfg.max_new_tokens)
    if len(examples) < cfg.n:
        raise UserError(f"--data={cfg.data} has {len(examples)} usable records, --n={cfg.n} asks for more; lower --n")
    model, _ = ckpt.load_for_training(model_dir, tok, template)
    return model, examples[:cfg.n], stop_ids(tok, template), tok.eos_id


def run_ours(cfg: BenchConfig) -> dict:
    from generate import generate

    device = torch.device(cfg.device)
    compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    model, examples, stop, pad_id = (toy_setup if workload(cfg) == "toy" else real_setup)(cfg)
    model.to(device)
    if compile and device.type == "cuda":
        model.compile()  # train.py's compile=True on a GPU
    # untimed one-time initialisation, as the peer's warm-up generate does (and its imports of transformers and
    # trl, which load torch._dynamo): a tiny generate, a scored forward (imports spin_kernels/logprob.py), and an
    # optimizer, whose first construction imports torch._dynamo (~1 s; train.py makes one at startup)
    import spin
    from train_config import TrainConfig, make_optimizer
    generate(model, [examples[0].prompt_ids, examples[1].prompt_ids], 2, eos_id=stop, seed=0)
    with torch.no_grad():
        spin.pair_logps(model, [examples[0].prompt_ids], [examples[0].real_ids], [examples[1].real_ids], pad_id,
                        device, cfg.pack_pairs)
    make_optimizer(model, TrainConfig(), cfg.lr)
    iterations = cfg.iterations or (2 if device.type == "cuda" else 1)
    runs = [one_iteration(model, examples, stop, pad_id, cfg, t, device, compile) for t in range(iterations)]
    return {**runs[-1], "iterations": runs, "vocab": model.config.vocab_size,
            "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": len(examples[0].prompt_ids),
            "compile": compile, "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


# ----------------------------------------------------------------------------------------------
# the peer, run by its own code


def find_peer(cfg: BenchConfig) -> str | None:
    for path in ([cfg.peer_script] if cfg.peer_script else PEER_CANDIDATES):
        if os.path.isfile(path):
            return path
    return None


def run_peer_functions(cfg: BenchConfig, path: str) -> dict:
    """The peer's main() up to its TOTAL (rollout + precompute=True training), through its own functions."""
    spec = importlib.util.spec_from_file_location("peer_spin_iteration", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    args = argparse.Namespace(trl_defaults=False, seed=cfg.seed, lr=cfg.lr, max_length=cfg.max_len)
    work = tempfile.mkdtemp(prefix="peer_spin_")
    try:
        if workload(cfg) == "real":
            tok, examples = peer.load_real(cfg.model, cfg.data, cfg.n)
            model_dir = cfg.model
        else:
            tok = peer.build_tokenizer(cfg.vocab_size, cfg.seed)
            model = peer.build_model(tok, cfg.seed)
            model_dir = os.path.join(work, "init_model")
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
            del model
            examples = peer.build_examples(cfg.n, cfg.seed)
        policy = peer.load_model(model_dir)
        params = sum(p.numel() for p in policy.parameters())
        cpu0 = time.process_time()
        completions, ro = peer.rollout(policy, tok, examples, cfg.rollout_batch_size, cfg.max_new_tokens, 0, cfg.seed,
                                       True)
        cpu_rollout = time.process_time() - cpu0
        del policy
        # SPIN's pairs as the peer builds them: chosen = the real answer, rejected = the sample
        train_ds = peer.Dataset.from_list([{"prompt": e["prompt"],
                                            "chosen": [{"role": "assistant", "content": e["answer"]}],
                                            "rejected": [{"role": "assistant", "content": c}]}
                                           for e, c in zip(examples, completions)])
        cpu0 = time.process_time()
        pre = peer.run_dpo(model_dir, tok, train_ds, True, args, work)  # loads the model (untimed there), trains
        cpu_train = time.process_time() - cpu0
        prompt = tok.apply_chat_template(examples[0]["prompt"], add_generation_prompt=True, tokenize=False)
        return {"rollout": ro, "train_precompute": pre,
                "spin_iteration_total_s": ro["rollout_s"] + pre["train_total_s"],
                "cpu_s": cpu_rollout + cpu_train,
                "vocab": len(tok), "params": params,
                "prompt_tokens": len(tok(prompt, add_special_tokens=False)["input_ids"])}
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def run_peer_script(cfg: BenchConfig, path: str) -> dict:
    """The unmodified script; its last line is 'JSON {...}'."""
    cmd = [sys.executable, path, f"--n={cfg.n}", f"--seed={cfg.seed}", f"--vocab-size={cfg.vocab_size}",
           f"--gen-batch-size={cfg.rollout_batch_size}", f"--max-new-tokens={cfg.max_new_tokens}",
           f"--max-length={cfg.max_len}", f"--lr={cfg.lr}"]
    if workload(cfg) == "real":
        cmd += [f"--model-dir={cfg.model}", f"--data={cfg.data}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in out.stdout.splitlines() if line.startswith("JSON ")]
    if out.returncode or not lines:
        raise RuntimeError(f"the peer script failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def peer_summary(record: dict) -> dict:
    """The peer's record in ours' terms."""
    ro, pre = record["rollout"], record["train_precompute"]
    logs = [entry for entry in pre.get("logs", []) if "num_tokens" in entry]
    return {"sampling_s": ro["rollout_s"], "opponent_logps_s": pre["precompute_ref_s"],
            "train_s": pre["train_total_s"] - pre["precompute_ref_s"], "total_s": record["spin_iteration_total_s"],
            "cpu_s": record.get("cpu_s"), "steps": pre["steps"], "gen_tokens": ro["gen_tokens"],
            "gen_positions": ro["gen_positions"],
            "train_tokens": float(logs[-1]["num_tokens"]) if logs else None, "loss": pre["final_loss"],
            "vocab": record.get("vocab"), "params": record.get("params"), "prompt_tokens": record.get("prompt_tokens")}


# ----------------------------------------------------------------------------------------------
# the driver: fresh processes, alternating sides


def worker(side: str, cfg: BenchConfig) -> None:
    t0, cpu0, busy0 = time.perf_counter(), time.process_time(), busy_cpu_seconds()
    if side == "ours":
        record = run_ours(cfg)
    elif cfg.peer_mode == "script":
        record = peer_summary(run_peer_script(cfg, find_peer(cfg)))
    else:
        record = peer_summary(run_peer_functions(cfg, find_peer(cfg)))
    wall, own = time.perf_counter() - t0, time.process_time() - cpu0
    # the script mode's work happens in a child process, whose CPU time this process does not see
    record["other_cpu_s"] = max(busy_cpu_seconds() - busy0 - own, 0.0) if own > 0.1 * wall else None
    record["process_wall_s"] = wall
    print("RESULT " + json.dumps(record))


def run_worker(side: str, argv: list[str], threads: int, python: str) -> dict:
    """One fresh process of a side; its record gets the process's peak RSS (wait4's ru_maxrss, KiB on Linux)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([python, os.path.abspath(__file__), f"--worker={side}", *argv], stdout=stdout,
                                 stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not lines:
        raise RuntimeError(f"the {side} run failed (exit {child.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return {**json.loads(lines[-1][7:]), "peak_rss_mb": usage.ru_maxrss / 1024}


def peer_available(cfg: BenchConfig) -> tuple[bool, str]:
    if cfg.peer == "no":
        return False, "peer=no"
    if cfg.device != "cpu":
        return False, "the peer runs on the CPU only"
    modules = ("trl", "transformers", "datasets", "tokenizers")
    if cfg.peer_python:
        if not os.access(cfg.peer_python, os.X_OK):
            raise UserError(f"--peer_python={cfg.peer_python!r} is not an executable; give a Python interpreter")
        probe = "import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m) is None))" % (modules,)
        missing = subprocess.run([cfg.peer_python, "-c", probe], capture_output=True, text=True).stdout.split()
    else:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
    path = find_peer(cfg)
    reason = (f"{', '.join(missing)} not installed (pip install -r bench/requirements-peer.txt)" if missing
              else "" if path else f"peer script not found ({cfg.peer_script or ' or '.join(PEER_CANDIDATES)})")
    if reason and cfg.peer == "yes":
        raise UserError(f"peer=yes but {reason}")
    return not reason, reason


def check_config(cfg: BenchConfig, with_peer: bool) -> None:
    if cfg.peer not in ("auto", "yes", "no"):
        raise UserError(f"--peer={cfg.peer!r}; use auto, yes or no")
    if cfg.peer_mode not in ("functions", "script"):
        raise UserError(f"--peer_mode={cfg.peer_mode!r}; use functions or script")
    if cfg.device not in ("cpu", "cuda"):
        raise UserError(f"--device={cfg.device!r}; use cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but CUDA is not available; use --device=cpu")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"--dtype={cfg.dtype!r}; use auto, float32 or bfloat16")
    if workload(cfg) == "real" and not os.path.isfile(cfg.data):
        raise UserError(f"--data={cfg.data!r} is not a file; give the workload's chat JSONL")
    if with_peer:
        fixed = PEER_FIXED_TOY if workload(cfg) == "toy" else PEER_FIXED
        differ = {k: getattr(cfg, k) for k, v in fixed.items() if getattr(cfg, k) != v}
        if differ:
            raise UserError(f"the peer script hard-codes {fixed}; these differ: {differ}; keep them or "
                            f"pass --peer=no")
        if cfg.dtype == "bfloat16":
            raise UserError("--dtype=bfloat16 changes ours only (the peer runs fp32); pass --peer=no with it")


def table(results: dict[str, list[dict]]) -> str:
    keys = [("sampling_s", "sampling (generate) s"), ("opponent_logps_s", "opponent log-probs s (TRL: reference)"),
            ("train_s", "training (policy steps) s"), ("total_s", "TOTAL one SPIN iteration s"),
            ("cpu_s", "own CPU-seconds (all threads)"), ("peak_rss_mb", "peak RSS of the process MB")]
    sides = [s for s in ("ours", "peer") if results.get(s)]
    both = len(sides) == 2
    lines = ["| median of runs | " + " | ".join(sides) + (" | peer/ours |" if both else " |"),
             "|---|" + "---|" * (len(sides) + both)]
    for key, label in keys:
        values = {s: [r[key] for r in results[s] if r.get(key) is not None] for s in sides}
        if not all(values.values()):
            continue
        med = {s: statistics.median(v) for s, v in values.items()}
        ratio = f" | {med['peer'] / med['ours']:.2f}" if both and med["ours"] else ""
        lines.append(f"| {label} | " + " | ".join(f"{med[s]:.2f}" for s in sides) + ratio + " |")
    for key, label in (("steps", "optimizer steps"), ("gen_tokens", "generated tokens (to EOS)"),
                       ("gen_positions", "sampled positions (batch x steps)"),
                       ("train_tokens", "training tokens per epoch (prompt + response, both sequences of a pair)")):
        counts = [results[s][-1].get(key) for s in sides]  # the script mode does not report them all
        lines.append(f"| {label} | " + " | ".join("?" if c is None else f"{c:.0f}" for c in counts)
                     + (" | |" if both else " |"))
    return "\n".join(lines)


def per_token_line(results: dict[str, list[dict]]) -> str:
    """Wall clock per training token on each side: the same count on both (per pair: prompt + real response and
    prompt + generated response, each side's own tokenizer; ours packs the prompt once, the count does not
    follow), so the ratio is the wall-clock ratio corrected for the two tokenizations' lengths."""
    tokens = {s: results[s][-1].get("train_tokens") for s in ("ours", "peer")}
    if not all(tokens.values()):
        return "per-token ratio: the peer's run does not report its training tokens"
    total = {s: statistics.median(r["total_s"] for r in results[s]) for s in tokens}
    per_token = {s: total[s] / tokens[s] * 1e3 for s in tokens}  # ms per training token
    return (f"per training token (prompt + response, both sequences of a pair; ours {tokens['ours']:.0f}, peer "
            f"{tokens['peer']:.0f} tokens): ours {per_token['ours']:.3f} ms, peer {per_token['peer']:.3f} ms -> "
            f"peer/ours {per_token['peer'] / per_token['ours']:.2f}x per token "
            f"(wall clock {total['peer'] / total['ours']:.2f}x)")


def main(argv: list[str]) -> None:
    side = next((a.split("=", 1)[1] for a in argv if a.startswith("--worker=")), None)
    argv = [a for a in argv if not a.startswith("--worker=")]
    cfg = resolved(configurator.load_config(BenchConfig, argv))
    if side:
        worker(side, cfg)
        return
    with_peer, why_not = peer_available(cfg)
    check_config(cfg, with_peer)
    print(f"torch {torch.__version__}, device {cfg.device}, OMP_NUM_THREADS={cfg.threads} per run, {cfg.reps} reps, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("peer: " + (f"{find_peer(cfg)} ({cfg.peer_mode})" if with_peer else f"skipped ({why_not})"), flush=True)
    results: dict[str, list[dict]] = {"ours": [], "peer": []}
    for rep in range(cfg.reps):
        for s in ("ours", "peer") if with_peer else ("ours",):
            load = os.getloadavg()[0]
            python = cfg.peer_python if s == "peer" and cfg.peer_python else sys.executable
            record = run_worker(s, argv, cfg.threads, python)
            record["load_before"] = load
            results[s].append(record)
            other = f"{record['other_cpu_s']:.0f}" if record.get("other_cpu_s") is not None else "?"
            cpu = f"{record['cpu_s']:.1f}" if record.get("cpu_s") is not None else "?"
            print(f"rep {rep} {s:4s}: total {record['total_s']:6.2f}s = sampling {record['sampling_s']:5.2f} + "
                  f"opponent log-probs {record['opponent_logps_s']:5.2f} + training {record['train_s']:6.2f}; own CPU "
                  f"{cpu} s; peak RSS {record['peak_rss_mb']:.0f} MB; load {load:.1f}, other processes {other} CPU-s "
                  f"during the run", flush=True)
    ours = results["ours"][-1]
    shape = f"GPT-2 shaped {cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads" if workload(cfg) == "toy" else cfg.model
    print(f"model: {shape}, vocab {ours['vocab']}, {ours['params'] / 1e6:.2f}M params, first prompt "
          f"{ours['prompt_tokens']} tokens; {cfg.n} conversations, {cfg.max_new_tokens} new tokens, lr {cfg.lr}, "
          f"max_len {cfg.max_len}, compute dtype {str(compute_dtype_of(cfg, torch.device(cfg.device)))[6:]}"
          + (f" (peer: vocab {results['peer'][-1]['vocab']}, {results['peer'][-1]['params'] / 1e6:.2f}M, prompt "
             f"{results['peer'][-1]['prompt_tokens']} tokens)" if results["peer"] else "")
          + (f"; {ours['device_name']}, compile={ours['compile']}" if cfg.device == "cuda" else ""))
    if cfg.device == "cuda":
        first = ours["iterations"][0]
        print(f"first iteration (includes compilation): {first['total_s']:.2f}s; the table shows the last")
    print(table(results))
    rate = statistics.median(r["train_flops_per_s"] for r in results["ours"])
    print(f"ours' training: {rate / 1e9:.1f} GFLOP/s (6 x {ours['params'] / 1e6:.1f}M params x "
          f"{ours['train_tokens_run']} tokens run / training seconds)")
    if results["peer"]:
        ratio = statistics.median(r["total_s"] for r in results["peer"]) / statistics.median(
            r["total_s"] for r in results["ours"])
        print(f"peer/ours total: {ratio:.2f}x (goal >= 2.0: {'met' if ratio >= 2.0 else 'MISSED'}); per rep: "
              + " ".join(f"{p['total_s'] / o['total_s']:.2f}" for o, p in zip(results["ours"], results["peer"])))
        print(per_token_line(results))
        rss = {s: statistics.median(r["peak_rss_mb"] for r in results[s]) for s in ("ours", "peer")}
        print(f"peak RSS: ours {rss['ours']:.0f} MB, peer {rss['peer']:.0f} MB -> ours/peer "
              f"{rss['ours'] / rss['peer']:.2f}x (goal <= 0.6: "
              f"{'met' if rss['ours'] <= 0.6 * rss['peer'] else 'MISSED'})")
    print("exact-opponent invariant, ours' first step (before any update): max |reward| "
          + " ".join(f"{r['first_step_max_abs_reward']:.2e}" for r in results["ours"]) + ", mean |reward| "
          + " ".join(f"{r['first_step_mean_abs_reward']:.2e}" for r in results["ours"]))
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump({"config": asdict(cfg), **results}, f, indent=1)


if __name__ == "__main__":
    configurator.run_main(main, sys.argv[1:])

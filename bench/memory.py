"""Benchmark: per-rank memory of a SPIN run, phase by phase, against memory_plan.py's plan.

- The run: config/quick.py shrunk to a few steps with a 57M-parameter Llama-style model (8 layers x 768, the
  byte tokenizer), stage sft+spin: 2 SFT steps, one SPIN iteration (a rollout of 64 prompts in batches of 32,
  sequences up to max_len = 64 tokens, then 4 steps), a checkpoint at each phase end.
- CPU (the default): 2 ranks under torchrun (gloo, FSDP2), one thread each. A phase's peak resident set size
  is /proc/self/status's VmHWM, reset at the phase's start through /proc/self/clear_refs; reported less the
  rank's resident size just before the model is built (interpreter, torch, data). glibc is told to mmap every
  allocation from 64 KiB up (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident set at once.
- GPU (--device=cuda): one process per GPU (--nproc), torch.cuda.max_memory_allocated per phase.
- Phases, marked by wrapping train.py's steps: rollout (run_rollout); training (from each forward_backward to
  the next, so the optimizer step counts); evaluation (evaluate); checkpoint (save). --repo runs another
  checkout's train.py with the same hooks (the 'before' figures); the plan is always this checkout's.

python bench/memory.py [--repo=<checkout>] [--device=cpu|cuda] [--nproc=2] [--n_layer=8 --n_embd=768 ...]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("rollout", "training", "evaluation", "checkpoint")
MIB = 1 << 20


@dataclass
class MemoryBenchConfig:
    repo: str = ""  # the checkout whose train.py runs ('' = this one)
    device: str = "cpu"  # 'cpu' | 'cuda'
    nproc: int = 0  # processes; 0 = 2 on the CPU, 1 on a GPU
    n_layer: int = 8
    n_head: int = 12
    n_kv_head: int = 12
    n_embd: int = 768
    max_len: int = 64  # generations run to it (an undertrained model rarely stops), so the plan's bound is met
    rollout_batch_size: int = 32
    prompts: int = 64  # prompts in the SPIN iteration's rollout
    batch_size: int = 8  # micro-batch per rank (pairs in SPIN)
    max_new_tokens: int = 64
    json_out: str = ""  # write the figures here


def run_arguments(cfg: MemoryBenchConfig, out_dir: str) -> list[str]:
    """train.py's arguments: config/quick.py shrunk to a few steps of a bigger model."""
    return [os.path.join(cfg.repo or REPO, "config", "quick.py"), f"--out_dir={out_dir}",
            f"--n_layer={cfg.n_layer}", f"--n_head={cfg.n_head}", f"--n_kv_head={cfg.n_kv_head}",
            f"--n_embd={cfg.n_embd}", f"--block_size={cfg.max_len}", f"--max_len={cfg.max_len}",
            f"--max_prompt_len={cfg.max_len // 2}", "--stage=sft+spin", "--baseline_sft=False", "--sft_steps=2",
            "--max_iterations=1", f"--prompts_per_iteration={cfg.prompts}", f"--synthetic_train={2 * cfg.prompts}",
            "--synthetic_val=4", "--eval_samples=4", f"--rollout_batch_size={cfg.rollout_batch_size}",
            f"--max_new_tokens={cfg.max_new_tokens}", f"--batch_size={cfg.batch_size}", "--grad_accum=1",
            "--log_interval=1", "--save_interval=0", "--keep_checkpoints=1", "--lr=1e-5", f"--device={cfg.device}"]


# ----------------------------------------------------------------------------------------------
# in each rank: phase peaks


def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


@dataclass
class PhaseMeter:
    """Peak memory per phase: resident set size on the CPU, allocated tensor memory on a GPU."""
    cuda: bool
    phase: str = "start"
    peaks: dict = field(default_factory=dict)  # phase -> its highest peak
    at_entry: dict = field(default_factory=dict)  # phase -> memory in use when it was first entered

    def now(self) -> int:
        import torch
        return torch.cuda.memory_allocated() if self.cuda else proc_status_bytes("VmRSS")

    def peak(self) -> int:
        import torch
        return torch.cuda.max_memory_allocated() if self.cuda else proc_status_bytes("VmHWM")

    def reset(self) -> None:
        import torch
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size

    def enter(self, phase: str) -> None:
        """Close the current phase (its peak since it began) and start `phase`."""
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.peak())
        self.reset()
        self.at_entry.setdefault(phase, self.now())
        self.phase = phase


def warm_up(device: str) -> None:
    """Load what a run loads on first use (the Triton kernels' modules, autograd, the optimizer's and the
    sampler's code paths) with a tiny model, so the baseline holds it and the phases hold only the run's data."""
    import torch

    import spin_kernels.attention  # noqa: F401
    import spin_kernels.logprob  # noqa: F401
    from generate import generate
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)).to(device)
    idx = torch.randint(0, 64, (2, 8), device=device)
    model.token_logprobs(idx, idx).sum().backward()
    torch.optim.AdamW(model.parameters()).step()
    generate(model, [[1, 2]], 2)


def measured_run(settings: dict) -> None:
    """A rank's run of train.py (from settings['repo']) with its steps wrapped to mark the phases; writes the
    figures to settings['figures']/rank<r>.json."""
    sys.path.insert(0, settings["repo"])  # before anything of nanospin's is imported
    import torch

    import train
    torch.set_num_threads(1)
    warm_up(settings["device"])
    meter = PhaseMeter(cuda=settings["device"] == "cuda")

    def marked(name: str, phase: str, after: str | None = "between"):
        real = getattr(train, name)

        def call(*a, **kw):
            meter.enter(phase)
            result = real(*a, **kw)
            if after:
                meter.enter(after)
            return result

        setattr(train, name, call)

    marked("build_model", "model")  # the baseline: memory in use just before the model exists
    marked("rollout_iteration", "rollout")
    marked("forward_backward", "training", after=None)  # open until the next phase: the optimizer step counts
    marked("evaluate", "evaluation")
    marked("save", "checkpoint")
    train.main(settings["argv"])
    meter.enter("end")
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(settings["figures"], f"rank{rank}.json"), "w") as f:
        json.dump({"baseline": meter.at_entry["model"], "peaks": meter.peaks, "at_entry": meter.at_entry}, f)


# ----------------------------------------------------------------------------------------------
# the parent: run, plan, table


def the_plan(cfg: MemoryBenchConfig, world_size: int):
    sys.path.insert(0, REPO)
    import torch

    from memory_plan import plan_memory
    from model import GPTConfig
    from tokenizer import load_tokenizer
    model = GPTConfig(model_type="llama", vocab_size=load_tokenizer("bytes").n_vocab, block_size=cfg.max_len,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd)
    cuda = cfg.device == "cuda"
    plan = plan_memory(model, world_size, world_size > 1, cuda, torch.bfloat16 if cuda else torch.float32, "adamw",
                       2 * cfg.batch_size, cfg.max_len, cfg.rollout_batch_size, False)
    return model, plan


def report(cfg: MemoryBenchConfig, ranks: list[dict], world_size: int) -> str:
    from memory_plan import total_params
    model, plan = the_plan(cfg, world_size)
    what = "resident set size less the rank's size before the model" if cfg.device == "cpu" else \
        "torch.cuda.max_memory_allocated"
    lines = [f"model: {total_params(model) / 1e6:.1f}M parameters; world size {world_size}, {cfg.device}; "
             f"checkout {cfg.repo or REPO}",
             f"per-rank peak per phase, MiB ({what}); plan: memory_plan.py",
             "| phase | " + " | ".join(f"rank {r}" for r in range(len(ranks))) + " | plan |",
             "|---|" + "---|" * (len(ranks) + 1)]
    plans = {"rollout": plan.rollout, "training": plan.training}
    for phase in PHASES:
        cells = [f"{(rank['peaks'].get(phase, 0) - rank['baseline']) / MIB:.0f}" for rank in ranks]
        expected = f"{plans[phase] / MIB:.0f}" if phase in plans else ""
        lines.append(f"| {phase} | " + " | ".join(cells) + f" | {expected} |")
    # what the rollout adds to the memory it starts with, against one compute-dtype copy + KV cache
    added = [(rank["peaks"]["rollout"] - rank["at_entry"]["rollout"]) / MIB for rank in ranks]
    lines.append("| rollout, above its start | " + " | ".join(f"{a:.0f}" for a in added) +
                 f" | copy {plan.rollout_weights / MIB:.0f} + KV cache {plan.kv_cache / MIB:.0f} = "
                 f"{(plan.rollout_weights + plan.kv_cache) / MIB:.0f} (+ forward {plan.rollout_forward / MIB:.0f}) |")
    starts = [(rank["at_entry"]["rollout"] - rank["baseline"]) / MIB for rank in ranks]
    lines.append("| at the rollout's start | " + " | ".join(f"{s:.0f}" for s in starts) +
                 f" | master weights {plan.params / MIB:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    sys.path.insert(0, REPO)
    from configurator import load_config
    cfg = load_config(MemoryBenchConfig, argv)
    nproc = cfg.nproc or (2 if cfg.device == "cpu" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "TQDM_DISABLE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"repo": os.path.abspath(cfg.repo or REPO), "device": cfg.device, "figures": tmp,
                    "argv": run_arguments(cfg, os.path.join(tmp, "out"))}
        with open(os.path.join(tmp, "settings.json"), "w") as f:
            json.dump(settings, f)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   os.path.abspath(__file__), "--measured-run", os.path.join(tmp, "settings.json")]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the run failed (exit code {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(nproc)]
    plan_lines = [line for line in proc.stdout.splitlines() if line.startswith(("memory plan", "  training:",
                                                                                "  rollout:"))]
    table = report(cfg, ranks, nproc)
    print("\n".join(plan_lines + ["", table]))
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump({"config": vars(cfg), "ranks": ranks}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measured-run"]:
        measured_run(json.load(open(sys.argv[2])))
    else:
        sys.path.insert(0, REPO)
        from configurator import run_main
        run_main(main, sys.argv[1:])

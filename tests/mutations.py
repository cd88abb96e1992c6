"""A mutation check of the test suite: realistic one-line bugs planted in the core, one at a time, each of which a
named test file must catch. Run `python tests/mutations.py` (not part of `python -m pytest`: the name is not
test_*.py); `--list` shows the mutations, `--only NAME[,NAME]` runs some, `-j N` runs N at once.

Design choices:
- Each mutation is (file, the exact text it replaces, the replacement, the test file and -k selection that must
  fail). The text must occur exactly once in its file; otherwise the mutation is STALE (the code moved) and the
  check fails until the entry is refreshed, so a list that no longer plants anything cannot pass silently.
- Each run is a fresh copy of the working tree (git's tracked and untracked-not-ignored files, never .venv) in a
  temporary directory, so the checkout is never touched, and mutations can run side by side.
- Every test file named is first run unmutated on the selections named: one that fails already would "catch"
  anything, so the check stops there.
- Caught = pytest exits 1 (a test failed) or 2 (collection failed); 0 = survived; anything else (no test selected,
  usage error) is an ERROR of this list. Exit 0 only when every mutation is caught, none stale, none in error.
- Selections are narrow (-k) so the whole list runs in minutes; the test named is the one meant to catch the bug,
  not just any test that happens to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1200  # seconds a test run may take; a mutation that hangs the tests past it counts as caught


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, found exactly once in `file`
    replacement: str
    test: str  # the test file that must fail
    k: str | None = None  # pytest -k selection inside it

    @property
    def selection(self) -> tuple[str, str | None]:
        return self.test, self.k


M = Mutation
MUTATIONS = [
    # --- spin.py
    M('loss-sign', 'spin.py', '-F.logsigmoid(beta * real_ratio - beta * generated_ratio)',
      '-F.logsigmoid(beta * generated_ratio - beta * real_ratio)', 'tests/test_spin.py', 'hand_computed'),
    M('ratio-against-wrong-opponent', 'spin.py', 'real_ratio = policy_real_logps - opponent_real_logps',
      'real_ratio = policy_real_logps - opponent_generated_logps', 'tests/test_spin.py', 'hand_computed'),
    M('ipo-target-sign', 'spin.py', 'generated_ratio - 1 / (2 * beta)) ** 2', 'generated_ratio + 1 / (2 * beta)) ** 2',
      'tests/test_spin.py', 'ipo'),
    M('nll-anchor-not-per-token', 'spin.py',
      'real_nll = None if real_tokens is None else -policy_real_logps / real_tokens',
      'real_nll = None if real_tokens is None else -policy_real_logps', 'tests/test_spin.py', 'nll_weight'),
    M('sft-loss-sign', 'spin.py', 'loss_sum = -logps.sum()', 'loss_sum = logps.sum()', 'tests/test_spin.py',
      'sft_micro_batch'),
    M('mixed-rollouts-keep-old-opponent-logps', 'spin.py', 'mixed += rescore(opponent, earlier[:own], settings)',
      'mixed += earlier[:own]', 'tests/test_train.py', 'mix_previous_rollouts'),
    M('every-epoch-the-first-rollout', 'spin.py', 'block = epoch % it.blocks', 'block = 0', 'tests/test_train.py',
      'regenerate_per_epoch'),
    M('kl-top-k-rest-dropped', 'spin.py', 'return kl_top + kl_rest', 'return kl_top', 'tests/test_spin.py', 'kl_'),
    M('margins-sign', 'spin.py', '(sums["rewards/real"] - sums["rewards/generated"]).item() / pairs',
      '(sums["rewards/generated"] - sums["rewards/real"]).item() / pairs', 'tests/test_spin.py', 'logged_metrics'),
    M('accuracy-counts-ties', 'spin.py', '"rewards/accuracies": (real_rewards > generated_rewards).float()',
      '"rewards/accuracies": (real_rewards >= generated_rewards).float()', 'tests/test_spin.py', 'rewards_are_zero'),
    M('packed-pair-order', 'spin.py', 'return logps[0::2], logps[1::2]', 'return logps[1::2], logps[0::2]',
      'tests/test_spin.py', 'pair_logps_equal_separate'),
    M('hinge-margin', 'spin.py', 'torch.relu(1 - (beta * real_ratio', 'torch.relu(0.5 - (beta * real_ratio',
      'tests/test_spin.py', 'hand_computed'),
    M('kl-reversed', 'spin.py', '(policy_logprobs.exp() * (policy_logprobs - opponent["logprobs"])).sum(-1)',
      '(opponent["logprobs"].exp() * (opponent["logprobs"] - policy_logprobs)).sum(-1)', 'tests/test_spin.py',
      'kl_with_the_whole'),
    M('prompt-subset-not-shuffled', 'spin.py', 'perm = torch.randperm(len(examples), generator=g)[:count]',
      'perm = torch.arange(len(examples))[:count]', 'tests/test_spin.py', 'prompt_subset'),
    # --- train.py
    M('global-loss-normalisation', 'train.py', '(loss_sum * rt.world_size / units).backward()',
      '(loss_sum * rt.world_size / len(micro)).backward()', 'tests/test_train.py', 'nll_weight_is_normalised'),
    # --- train_config.py
    M('warmup', 'train_config.py', 'return max_lr * (step + 1) / (warmup + 1)', 'return max_lr * step / warmup',
      'tests/test_train.py', 'lr_schedules'),
    M('cosine-quarter', 'train_config.py', '(1 + math.cos(math.pi * progress))',
      '(1 + math.cos(math.pi * progress / 2))', 'tests/test_train.py', 'lr_schedules'),
    # --- fsdp.py
    M('micro-batch-sums-overwritten', 'fsdp.py', '{name: total[name] + value if name in total else value',
      '{name: value', 'tests/test_train.py', 'nll_weight_is_normalised'),
    # --- data.py
    M('loss-mask-drops-end-of-turn', 'data.py', 'targets[b, len(p) - 1 : len(seq) - 1] = seq[len(p):]',
      'targets[b, len(p) - 1 : len(seq) - 2] = seq[len(p):-1]', 'tests/test_data.py', 'collate or end_of_turn'),
    M('multi-turn-first-assistant-turn', 'data.py', 'prompt_ids, real_ids = render_example(tok, messages, template)',
      "prompt_ids, real_ids = render_example(tok, messages[:next(i for i, m in enumerate(messages) "
      "if m['role'] == 'assistant') + 1], template)",
      'tests/test_data.py', 'multi_turn'),
    M('truncate-keeps-prompt-start', 'data.py', 'prompt_ids = prompt_ids[-max_prompt_len:]',
      'prompt_ids = prompt_ids[:max_prompt_len]', 'tests/test_data.py', 'truncate or prompt_end or keeps_its_end'),
    M('rank-slice-of-global-batch', 'data.py', 'batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]',
      'batch[self.rank : self.rank + self.batch_size]', 'tests/test_data.py', 'rank'),
    M('same-order-every-epoch', 'data.py', 'np.random.default_rng([self.seed, epoch])',
      'np.random.default_rng([self.seed, 0])', 'tests/test_data.py', 'epoch'),
    M('order-resume-position', 'data.py', 'self.epoch, self.position = int(state["epoch"]), int(state["position"])',
      'self.epoch, self.position = int(state["epoch"]), 0', 'tests/test_data.py', 'resumed_order'),
    M('truncate-room', 'data.py', 'room = max_len - len(prompt_ids)', 'room = max_len - len(prompt_ids) - 1',
      'tests/test_data.py', 'truncate or fit_max_len'),
    # --- packing.py
    M('packed-positions-run-on', 'packing.py', 'positions = positions + list(range(n, n + len(response)))',
      'positions = positions + list(range(len(positions), len(positions) + len(response)))', 'tests/test_packing.py',
      'unpacked_positions'),
    M('packed-response-span-off-by-one', 'packing.py', 'first = start + len(documents[d][0]) - 1',
      'first = start + len(documents[d][0])', 'tests/test_packing.py', 'equal_unpacked_sdpa'),
    M('packed-responses-see-each-other', 'packing.py',
      '(segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :])', '(segments[:, None, :] >= 0)',
      'tests/test_packing.py', 'equal_unpacked_sdpa'),
    M('causal-mask-flipped', 'packing.py', 'visible = (index[:, None] >= index[None, :])[None]',
      'visible = (index[:, None] <= index[None, :])[None]', 'tests/test_packing.py', 'equal_unpacked_sdpa'),
    M('first-fit-strict', 'packing.py', 'if u + lengths[d] <= row_len', 'if u + lengths[d] < row_len',
      'tests/test_packing.py', 'first_fit'),
    M('packed-window-inclusive', 'packing.py', 'positions[:, :, None] - positions[:, None, :] < window)',
      'positions[:, :, None] - positions[:, None, :] <= window)', 'tests/test_sliding_window.py', 'windowed_logits'),
    # --- model.py
    M('rotary-half-sign', 'model.py', 'rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)',
      'rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)', 'tests/test_checkpoint.py',
      'gives_transformers_logits'),
    M('rms-norm-sum', 'model.py', 'x32.pow(2).mean(-1, keepdim=True) + eps', 'x32.pow(2).sum(-1, keepdim=True) + eps',
      'tests/test_checkpoint.py', 'gives_transformers_logits'),
    M('kv-cache-prefill-rows', 'model.py', 'self.k[:, :, :T].index_copy_(0, rows, k)', 'self.k[:, :, :T].copy_(k)',
      'tests/test_generate.py', 'ragged_equals_alone or continuous_batching'),
    M('sdpa-not-causal', 'model.py', 'F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)',
      'F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)', 'tests/test_model.py', 'causality'),
    M('swiglu-swapped', 'model.py', 'self.down(F.silu(self.gate(x)) * self.up(x))',
      'self.down(F.silu(self.up(x)) * self.gate(x))', 'tests/test_checkpoint.py', 'gives_transformers_logits'),
    M('llama3-scaling-side', 'model.py', 'torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)',
      'torch.where(wavelen < old_len / low, inv_freq / factor, inv_freq)', 'tests/test_checkpoint.py',
      'gives_transformers_logits'),
    M('grown-rows-zero', 'model.py', 'wte.weight[old:] = self.wte.weight.mean(0)', 'wte.weight[old:] = 0',
      'tests/test_recipes.py', 'grow'),
    # --- spin_kernels/logprob.py
    M('logprob-no-max-subtraction', 'spin_kernels/logprob.py', 'row_max = x.amax(dim=1, keepdim=True)',
      'row_max = torch.zeros_like(x[:, :1])', 'tests/test_logprob.py', 'magnitudes'),
    M('dlogits-sign', 'spin_kernels/logprob.py', 'x.sub_(lse[:, None]).exp_().mul_(-upstream[:, None])',
      'x.sub_(lse[:, None]).exp_().mul_(upstream[:, None])', 'tests/test_logprob.py', 'values_and_grads'),
    # --- spin_kernels/attention.py
    M('attention-kernel-causal-mask', 'spin_kernels/attention.py', 'visible = visible & (k_offs <= q_offs)',
      'visible = visible & (k_offs < q_offs + 1 + (q_offs % 2))', 'tests/test_attention.py',
      'matches_float64_reference'),
    M('attention-kernel-window', 'spin_kernels/attention.py', 'visible = visible & (q_position - k_position < window)',
      'visible = visible & (q_position - k_position <= window)', 'tests/test_attention.py', 'masked_kernels'),
    M('attention-kernel-segments', 'spin_kernels/attention.py',
      'visible = visible & (k_doc == q_doc) & ((k_segment == 0) | (k_segment == q_segment))',
      'visible = visible & (k_doc == q_doc)', 'tests/test_attention.py', 'masked_kernels'),
    # --- generate.py
    M('top-p-boundary', 'generate.py', '(torch.cumsum(sorted_probs, dim=-1) < p)',
      '(torch.cumsum(sorted_probs, dim=-1) <= p)', 'tests/test_generate.py', 'top_p'),
    M('top-k-drops-ties', 'generate.py', 'logits.masked_fill(logits < kth, float("-inf"))',
      'logits.masked_fill(logits <= kth, float("-inf"))', 'tests/test_generate.py', 'top_k'),
    M('min-p-boundary', 'generate.py', 'probs < min_p * probs.amax(-1, keepdim=True)',
      'probs <= min_p * probs.amax(-1, keepdim=True)', 'tests/test_generate.py', 'min_p'),
    M('temperature-multiplies', 'generate.py', 'logits = logits / sampling.temperature',
      'logits = logits * sampling.temperature', 'tests/test_generate.py', 'follow_the_softmax'),
    M('stop-token-dropped', 'generate.py', 'out.append(row[:ends[0] + 1] if ends else row[:budget])',
      'out.append(row[:ends[0]] if ends else row[:budget])', 'tests/test_generate.py', 'eos'),
    M('decode-mask-window', 'generate.py', 'seen & (key_pos > query - window)', 'seen & (key_pos >= query - window)',
      'tests/test_sliding_window.py', 'kv_cached_greedy'),
    M('decode-mask-causal', 'generate.py', 'seen = key_pos <= query', 'seen = key_pos < query + 2',
      'tests/test_generate.py', 'cached_greedy_equals_uncached'),
    M('row-budget', 'generate.py', 'budgets.append(min(max_new, max_len - len(p)))',
      'budgets.append(min(max_new, max_len - len(p) + 1))', 'tests/test_generate.py', 'max_len'),
    M('derived-seed-offset', 'generate.py', 'return seed + offset + stride * index', 'return seed + stride * index',
      'tests/test_train.py', 'derived_seeds'),
    M('logprob-of-sampled-token', 'generate.py',
      'logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)',
      'logits.gather(-1, tokens[:, None])[:, 0] - logits.amax(-1)', 'tests/test_generate.py',
      'unmodified_model_logprobs'),
    # --- checkpoint.py
    M('optimizer-not-reloaded', 'checkpoint.py', '    load_optimizer(path, model, optimizer)\n',
      '    pass  # optimizer state not reloaded\n', 'tests/test_checkpoint.py', 'restores_rng'),
    M('rng-not-restored', 'checkpoint.py', '    set_rng_state(state["rng"])\n', '    pass  # RNG not restored\n',
      'tests/test_checkpoint.py', 'restores_rng'),
    M('exported-kv-heads', 'checkpoint.py', '"num_key_value_heads": cfg.n_kv_head', '"num_key_value_heads": cfg.n_head',
      'tests/test_checkpoint.py', 'transformers'),
    M('exported-rope-theta', 'checkpoint.py', '"rope_theta": cfg.rope_theta,', '"rope_theta": 10000.0,',
      'tests/test_checkpoint.py', 'every_exported'),
    M('keep-one-more-checkpoint', 'checkpoint.py', 'for old in list_checkpoints(out_dir)[:-keep] + leftovers:',
      'for old in list_checkpoints(out_dir)[:-keep - 1] + leftovers:', 'tests/test_checkpoint.py',
      'latest_checkpoint_and_keep'),
    M('resume-from-earliest', 'checkpoint.py', 'latest = os.path.join(root, names[-1])',
      'latest = os.path.join(root, names[0])', 'tests/test_checkpoint.py', 'latest_checkpoint_and_keep'),
    M('no-barrier-before-config-json', 'checkpoint.py', '_barrier()  # every rank has read out_dir',
      'pass  # every rank has read out_dir', 'tests/test_distributed.py', 'every_rank_reads_out_dir'),
    # --- configurator.py
    M('torchrun-rank-tears-down', 'configurator.py', '    if "RANK" not in os.environ:\n        return _run_main',
      '    if True:\n        return _run_main', 'tests/test_config.py', 'torchrun_rank'),
    M('torchrun-rank-loses-exit-code', 'configurator.py',
      'code = e.code if isinstance(e.code, int) else int(e.code is not None)', 'code = 1', 'tests/test_config.py',
      'torchrun_rank'),
    # --- evaluator.py
    M('held-out-nll-per-example', 'evaluator.py', 'tokens += sum(len(e.real_ids) for e in batch)',
      'tokens += len(batch)', 'tests/test_train.py', 'held_out_nll'),
    M('eval-reward-accuracy-mean', 'evaluator.py', '"eval/reward_accuracy": metrics["rewards/accuracies"].sum()',
      '"eval/reward_accuracy": metrics["rewards/accuracies"].mean()', 'tests/test_train.py', 'held_out_pair_metrics'),
    M('verdict-direction', 'evaluator.py', '("SPIN higher" if mean > 0 else "SPIN lower")',
      '("SPIN higher" if mean < 0 else "SPIN lower")', 'tests/test_train.py', 'verdict'),
    # --- metrics_log.py
    M('paired-interval-unpaired', 'metrics_log.py', 'mean_ci([x - y for x, y in zip(a, b, strict=True)])',
      'mean_ci([x - y for x, y in zip(a, sorted(b), strict=True)])', 'tests/test_train.py', 'paired_interval'),
    # --- templates.py
    M('strip-stop-keeps-stop', 'templates.py', 'next((list(ids[:i]) for i, token in enumerate(ids) if token in stops)',
      'next((list(ids[:i + 1]) for i, token in enumerate(ids) if token in stops)', 'tests/test_templates.py',
      'text_of_a_response'),
    M('response-without-end-of-turn', 'templates.py', 'tail[: end.end()] if end else tail',
      'tail[: end.start()] if end else tail', 'tests/test_templates.py', 'response_ends_with'),
    # --- tokenizer.py
    M('decode-drops-last-id', 'tokenizer.py', 'ids = [i for i in ids if 0 <= i < self.n_vocab]',
      'ids = [i for i in ids if 0 <= i < self.n_vocab - 1]', 'tests/test_tokenizer.py', 'decode'),
    M('content-matches-specials', 'tokenizer.py',
      'return self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)',
      'return self.enc.encode(text, allowed_special="all")', 'tests/test_templates.py', 'inject'),
]


def tree_files(repo: Path) -> list[str]:
    """The working tree as git sees it: tracked files and untracked ones not ignored (never .venv)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and not f.startswith(".venv/") and (repo / f).is_file()]


def copy_tree(repo: Path, files: list[str], dst: Path) -> None:
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, dst / f)


def staleness(m: Mutation, repo: Path) -> str | None:
    """Why the mutation cannot be applied as written, or None."""
    path = repo / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    count = path.read_text().count(m.original)
    return None if count == 1 else f"its text occurs {count} times in {m.file} (must be once): refresh the entry"


def run_tests(copy: Path, test: str, k: str | None, python: str) -> tuple[int, float, str]:
    """(pytest's exit code, seconds, its output's tail) for one test file/selection in `copy`."""
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test] + (["-k", k] if k else [])
    env = dict(os.environ)
    real = REPO.parent / "shared" / "real"
    if real.is_dir():  # the copy sits elsewhere: point the tests at the real files the checkout sees
        env.setdefault("NANOSPIN_REAL_FILES", str(real))
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        return proc.returncode, time.time() - start, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        return -1, time.time() - start, f"timed out after {TIMEOUT}s"


def in_copy(files: list[str], python: str, test: str, k: str | None, mutation: Mutation | None = None):
    with tempfile.TemporaryDirectory(prefix="nanospin-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(REPO, files, copy)
        if mutation is not None:
            path = copy / mutation.file
            path.write_text(path.read_text().replace(mutation.original, mutation.replacement, 1))
        return run_tests(copy, test, k, python)


def baseline_selections(mutations: list[Mutation]) -> list[tuple[str, str | None]]:
    """One run per test file covering every selection of it ('(a) or (b)'; the whole file if one names no -k):
    a selection that fails unmutated fails its file's run. One that selects nothing shows as its mutation's ERROR
    (pytest exits 5)."""
    by_file: dict[str, set] = {}
    for m in mutations:
        by_file.setdefault(m.test, set()).add(m.k)
    return [(test, None if None in ks else " or ".join(f"({k})" for k in sorted(ks))) for test, ks in
            sorted(by_file.items())]


def verdict(code: int) -> str:
    if code == 0:
        return "SURVIVED"
    if code in (1, 2):
        return "caught"
    if code == -1:
        return "caught (timeout)"
    return f"ERROR (pytest exit {code})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", help="comma-separated mutation names to run")
    parser.add_argument("-j", type=int, default=1, help="mutations run at once (default 1)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    parser.add_argument("-v", action="store_true", help="print the test output of survivors and errors")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        print("error: tests/mutations.py: two mutations share a name; rename one", file=sys.stderr)
        return 2
    chosen = MUTATIONS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"error: --only: unknown mutation(s) {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in wanted]
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.file:28} {m.test}" + (f" -k '{m.k}'" if m.k else ""))
        print(f"{len(chosen)} mutations over {len({m.file for m in chosen})} files")
        return 0
    if args.j < 1:
        print("error: -j must be >= 1", file=sys.stderr)
        return 2

    t0 = time.time()
    files = tree_files(REPO)
    stale = {m.name: why for m in chosen if (why := staleness(m, REPO))}
    runnable = [m for m in chosen if m.name not in stale]

    selections = baseline_selections(runnable)
    print(f"baseline: {len(selections)} test files unmutated (every selection of each in one run), then "
          f"{len(runnable)} mutations (-j {args.j})", flush=True)
    with ThreadPoolExecutor(args.j) as pool:
        baselines = dict(zip(selections, pool.map(lambda s: in_copy(files, args.python, *s), selections)))
    broken = {s: r for s, r in baselines.items() if r[0] != 0}
    for (test, k), (code, _, tail) in broken.items():
        print(f"BASELINE FAILS: {test}" + (f" -k '{k}'" if k else "") + f" exits {code} unmutated:\n{tail}")
    if broken:
        print("the score would be meaningless: fix these tests (or their selections) first")
        return 1

    def one(m: Mutation):
        code, seconds, tail = in_copy(files, args.python, m.test, m.k, m)
        print(f"  {m.name}: {verdict(code)} ({seconds:.0f}s)", flush=True)
        return code, seconds, tail

    with ThreadPoolExecutor(args.j) as pool:
        results = dict(zip([m.name for m in runnable], pool.map(one, runnable)))

    print()
    print(f"{'mutation':40} {'file':28} {'test':48} {'result':18} {'s':>5}")
    caught = 0
    for m in chosen:
        selection = m.test.removeprefix("tests/") + (f" -k {m.k}" if m.k else "")
        if m.name in stale:
            print(f"{m.name:40} {m.file:28} {selection[:48]:48} {'STALE':18} {'':>5}  {stale[m.name]}")
            continue
        code, seconds, tail = results[m.name]
        result = verdict(code)
        caught += result.startswith("caught")
        print(f"{m.name:40} {m.file:28} {selection[:48]:48} {result:18} {seconds:5.0f}")
        if args.v and not result.startswith("caught"):
            print(tail)
    print(f"\nscore: {caught}/{len(chosen)} caught ({100 * caught / len(chosen):.0f}%), {len(stale)} stale, "
          f"wall time {time.time() - t0:.0f}s")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

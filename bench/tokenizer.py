"""Benchmark: encode throughput of nanospin's tokenizers against the `tokenizers` library on the same text.

Real tokenizers from ../shared/real (or $NANOSPIN_REAL_FILES): Llama-2 (SentencePiece-style: tokenizer.json and
the bare tokenizer.model) and GPT-2 (byte-level); each one absent is skipped. The text is this repository's own
files (code, Markdown) plus, where present, the NeMo chat data's turns (prose): every file or turn is one document,
encoded with one call, and the whole text once as one string. MB/s = UTF-8 megabytes / median CPU seconds of
--repeats passes (CPU time, as the machine may be shared; the process is pinned to one core and `tokenizers` to one
thread, so CPU seconds are seconds on that core). Both sides' ids are compared first
(special-token text kept as text on both). Goal: >= 1 MB/s on one core.
Run from the repo root: python bench/tokenizer.py [--repeats 5]
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before `tokenizers` is imported: one thread, as nanospin's
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tokenizer import load_tokenizer  # noqa: E402


def real_files() -> str | None:
    for root in (os.environ.get("NANOSPIN_REAL_FILES", ""), os.path.join(REPO, "..", "shared", "real"),
                 os.path.join(REPO, "..", "..", "shared", "real")):
        if root and os.path.isdir(root):
            return os.path.abspath(root)
    return None


def documents(real: str | None) -> list[str]:
    """This repository's files, then the chat data's turns if present."""
    docs = []
    for path in sorted(glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
                       + glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            docs.append(f.read())
    chat = os.path.join(real or "", "chat_data", "nemo_aligner_dummy-sft.jsonl")
    if real and os.path.isfile(chat):
        with open(chat, encoding="utf-8") as f:
            docs += [turn["value"] for line in f for turn in json.loads(line)["conversations"]]
    return docs


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def bench_one(name: str, ours_path: str, hf_path: str, docs: list[str], repeats: int) -> list[str]:
    from tokenizers import Tokenizer as HFTokenizer

    if ours_path.endswith(".model"):  # alone: its folder's legacy=false config asks for another dummy-prefix rule
        ours_path = shutil.copy(ours_path, tempfile.mkdtemp())
    start = time.process_time()
    tok = load_tokenizer(ours_path)
    load_ours = time.process_time() - start
    start = time.process_time()
    hf = HFTokenizer.from_file(hf_path)
    load_hf = time.process_time() - start
    hf.no_truncation()
    hf.encode_special_tokens = True  # special-token text stays text, as in nanospin
    whole = "\n".join(docs)
    mismatches = sum(tok.encode(d) != hf.encode(d, add_special_tokens=False).ids for d in docs)
    same_whole = tok.encode(whole) == hf.encode(whole, add_special_tokens=False).ids
    megabytes = len(whole.encode()) / 1e6
    rows = []
    for what, ours, theirs in [
        ("per document", lambda: [tok.encode(d) for d in docs],
         lambda: [hf.encode(d, add_special_tokens=False) for d in docs]),
        ("one string", lambda: tok.encode(whole), lambda: hf.encode(whole, add_special_tokens=False)),
    ]:
        ours_s, theirs_s = median_seconds(ours, repeats), median_seconds(theirs, repeats)
        rows.append(f"| {name} | {what} | {megabytes / ours_s:.2f} | {megabytes / theirs_s:.2f} | "
                    f"{theirs_s / ours_s:.2f}x |")
    print(f"{name}: ids equal on {len(docs) - mismatches}/{len(docs)} documents, whole text equal: {same_whole}; "
          f"load (CPU s): nanospin {load_ours:.2f}, tokenizers {load_hf:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    real = real_files()
    docs = documents(real)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {len(docs)} documents, "
          f"{len(''.join(docs).encode()) / 1e6:.2f} MB; median of {args.repeats}", flush=True)
    cases = [("Llama-2 tokenizer.json", "llama2_hf", "llama2_hf/tokenizer.json"),
             ("Llama-2 tokenizer.model", "llama2_hf/tokenizer.model", "llama2_hf/tokenizer.json"),
             ("GPT-2 tokenizer.json", "gpt2_hf", "gpt2_hf/tokenizer.json")]
    rows = ["| tokenizer | encode | nanospin MB/s | tokenizers MB/s | speed-up |", "|---|---|---|---|---|"]
    for name, ours, theirs in cases:
        if real is None or not os.path.exists(os.path.join(real, ours)):
            print(f"{name}: skipped (not in ../shared/real)")
            continue
        rows += bench_one(name, os.path.join(real, ours), os.path.join(real, theirs), docs, args.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

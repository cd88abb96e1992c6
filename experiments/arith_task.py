"""A checkable task for a real chat model: two-step arithmetic word problems with worked answers.

Design choices:
- Each item is a small story (shopping, reading, saving, boxes, trips, ...) with two operations on numbers
  below 100; the final answer is an integer. Each story has several phrasings of the question so a model
  cannot learn one surface form, and every real answer follows one worked style: the two steps written as
  equations, then "The answer is N." That style is what SFT teaches; the checker only needs the last number.
- The checker is `final_number`: the last number in an answer must equal the last number in the real answer
  (data.check_final_number), so a held-out file needs no extra field and GSM8K-style data works the same.
- Items are drawn from a seeded stream: the same seed writes the same files. Held-out items are distinct
  from training items (the question text is the key).
- `score` answers the held-out questions with a model directory (T=1 and greedy) and prints both accuracies:
  how the untouched model does before any SFT.

python experiments/arith_task.py write [--n_train=384] [--n_val=128] [--seed=0] [--out=experiments]
python experiments/arith_task.py score --model=DIR [--data=experiments/arith_val.jsonl] [--n=64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["Maya", "Leo", "Aisha", "Tom", "Sofia", "Ravi", "Emma", "Kenji", "Lucia", "Omar", "Nina", "Jack"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards"]


def _shop(r: random.Random) -> tuple[str, list[str], int]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(10, 60), r.randint(3, 30)
    c = r.randint(2, a + b - 1)
    q = r.choice([
        f"{name} has {a} {item}. {name} gets {b} more and then gives {c} to a friend. How many {item} does {name} "
        f"have now?",
        f"{name} starts the day with {a} {item}, receives {b} more, and later gives away {c}. How many {item} are "
        f"left?",
        f"At first {name} owns {a} {item}. After getting {b} more, {name} hands {c} of them to a neighbour. How "
        f"many {item} does {name} own at the end?",
    ])
    steps = [f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}.",
             f"Giving away {c} leaves {a + b} - {c} = {a + b - c}."]
    return q, steps, a + b - c


def _boxes(r: random.Random) -> tuple[str, list[str], int]:
    item = r.choice(ITEMS)
    a, b = r.randint(3, 12), r.randint(2, 9)
    c = r.randint(1, a * b - 1)
    q = r.choice([
        f"A box holds {a} {item}. There are {b} full boxes, and {c} {item} are taken out. How many {item} remain?",
        f"Each box contains {a} {item}. If you have {b} boxes and remove {c} {item}, how many {item} are left?",
        f"{b} boxes are filled with {a} {item} each. Someone takes {c} {item}. How many {item} are still in the "
        f"boxes?",
    ])
    steps = [f"{b} boxes of {a} {item} hold {b} * {a} = {a * b}.",
             f"Taking out {c} leaves {a * b} - {c} = {a * b - c}."]
    return q, steps, a * b - c


def _reading(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    a, b, c = r.randint(4, 15), r.randint(2, 7), r.randint(5, 40)
    q = r.choice([
        f"{name} reads {a} pages a day for {b} days and then {c} more pages on Sunday. How many pages did {name} "
        f"read in total?",
        f"For {b} days {name} reads {a} pages each day. On the weekend {name} reads another {c} pages. What is the "
        f"total number of pages?",
        f"{name} reads {a} pages every day for {b} days, plus {c} extra pages at the end. How many pages is that "
        f"altogether?",
    ])
    steps = [f"{b} days of {a} pages is {b} * {a} = {a * b} pages.",
             f"Adding the {c} extra pages gives {a * b} + {c} = {a * b + c}."]
    return q, steps, a * b + c


def _money(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(NAMES)
    b, c = r.randint(3, 25), r.randint(3, 25)
    a = r.randint(b + c + 1, 99)
    q = r.choice([
        f"{name} has {a} dollars, spends {b} dollars on lunch and {c} dollars on a book. How many dollars are left?",
        f"With {a} dollars in a wallet, {name} pays {b} dollars for a ticket and {c} dollars for snacks. How much "
        f"money does {name} have left?",
        f"{name} takes {a} dollars to the market, buys fruit for {b} dollars and bread for {c} dollars. How many "
        f"dollars remain?",
    ])
    steps = [f"After spending {b} dollars, {name} has {a} - {b} = {a - b}.",
             f"After spending {c} more, {name} has {a - b} - {c} = {a - b - c}."]
    return q, steps, a - b - c


def _trip(r: random.Random) -> tuple[str, list[str], int]:
    a, b, c = r.randint(20, 80), r.randint(2, 5), r.randint(5, 50)
    vehicle = r.choice(["train", "bus", "car", "truck"])
    q = r.choice([
        f"A {vehicle} travels {a} km each hour for {b} hours, then {c} km more. How many km does it travel in "
        f"total?",
        f"A {vehicle} goes {a} km per hour for {b} hours and afterwards drives another {c} km. What distance does "
        f"it cover?",
        f"For {b} hours a {vehicle} moves at {a} km per hour. It then covers {c} more km. How far did it go?",
    ])
    steps = [f"{b} hours at {a} km per hour is {b} * {a} = {a * b} km.",
             f"Adding {c} km gives {a * b} + {c} = {a * b + c}."]
    return q, steps, a * b + c


def _share(r: random.Random) -> tuple[str, list[str], int]:
    item = r.choice(ITEMS)
    b, k = r.randint(2, 8), r.randint(3, 12)
    a, c = b * k, r.randint(2, 15)
    name = r.choice(NAMES)
    q = r.choice([
        f"{a} {item} are shared equally among {b} children. {name} is one of them and then finds {c} more. How "
        f"many {item} does {name} have?",
        f"{name} and the other children, {b} in all, split {a} {item} evenly. Later {name} gets {c} more. How "
        f"many {item} does {name} have now?",
        f"There are {a} {item} divided equally between {b} kids. {name}, one of the kids, is then given {c} more. "
        f"How many {item} does {name} end up with?",
    ])
    steps = [f"Each child gets {a} / {b} = {k}.", f"With {c} more, {name} has {k} + {c} = {k + c}."]
    return q, steps, k + c


STORIES = [_shop, _boxes, _reading, _money, _trip, _share]


def conversation(r: random.Random) -> list[dict]:
    question, steps, answer = r.choice(STORIES)(r)
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": " ".join(steps) + f" The answer is {answer}."}]


def split(n_train: int, n_val: int, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Distinct questions: held-out first (so a larger training set keeps the same held-out set), then training."""
    r, seen, out = random.Random(seed), set(), []
    while len(out) < n_train + n_val:
        conv = conversation(r)
        if conv[0]["content"] not in seen:
            seen.add(conv[0]["content"])
            out.append(conv)
    return out[n_val:], out[:n_val]


def write(args) -> None:
    train, val = split(args.n_train, args.n_val, args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, convs in (("arith_train.jsonl", train), ("arith_val.jsonl", val)):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as f:
            for conv in convs:
                f.write(json.dumps({"messages": conv}) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {path}: {len(convs)} conversations")


def score(args) -> None:
    sys.path.insert(0, REPO)
    import torch

    from checkpoint import load_for_chat
    from data import check_final_number
    from generate import GREEDY, Sampling, derive_seed, generate
    from templates import render_prompt, response_text, stop_ids

    torch.set_num_threads(args.threads)
    model, tok, template = load_for_chat(args.model, device="cpu")
    convs = [json.loads(line)["messages"] for line in open(args.data)][:args.n]
    prompts = [render_prompt(tok, conv[:-1], template) for conv in convs]
    for name, sampling in (("greedy", GREEDY), ("T=1", Sampling(temperature=1.0))):
        answers = generate(model, prompts, args.max_new_tokens, sampling=sampling, eos_id=stop_ids(tok, template),
                           seed=derive_seed(args.seed, "checker"), batch_size=args.batch_size)
        texts = [response_text(tok, ids, template) for ids in answers]
        right = [check_final_number(t, c[-1]["content"])["valid"] == 1 for t, c in zip(texts, convs)]
        print(f"{name}: {sum(right)}/{len(right)} = {100 * sum(right) / len(right):.1f}%")
        for t, c, ok in list(zip(texts, convs, right))[:args.show]:
            print(f"  [{'ok' if ok else 'no'}] Q: {c[0]['content']}\n       A: {t!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--n_train", type=int, default=384)
    w.add_argument("--n_val", type=int, default=128)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", default=os.path.join(REPO, "experiments"))
    s = sub.add_parser("score")
    s.add_argument("--model", required=True)
    s.add_argument("--data", default=os.path.join(REPO, "experiments", "arith_val.jsonl"))
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--max_new_tokens", type=int, default=96)
    s.add_argument("--batch_size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--show", type=int, default=4)
    args = p.parse_args()
    write(args) if args.cmd == "write" else score(args)


if __name__ == "__main__":
    main()

"""The 'final_number' checker (config key 'checker') and the arithmetic task that uses it (experiments/arith_task.py)."""

import importlib.util
import json
import random
import re

import pytest

from data import check_final_number, last_number
from train_runs import REPO, TINY, metrics, run_in_process

spec = importlib.util.spec_from_file_location("arith_task", REPO / "experiments" / "arith_task.py")
arith_task = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arith_task)


@pytest.mark.parametrize("answer, real, valid", [
    ("12 + 7 = 19. The answer is 19.", "The answer is 19.", 1.0),
    ("The answer is 19. I hope this helps!", "19", 1.0),
    ("First 19, so the answer is 20.", "The answer is 19.", 0.0),  # the last number counts, not any number
    ("The total is 1,200.", "The answer is 1200.", 1.0),  # thousands separators read as one number
    ("It is -3.", "The answer is 3.", 0.0),  # a sign is part of the number
    ("It is 19.5.", "The answer is 19.", 0.0),
    ("I do not know.", "The answer is 19.", 0.0),
    ("19", "no number here", 0.0),  # a real answer without a number can never be matched
])
def test_final_number_compares_the_last_numbers(answer, real, valid):
    assert check_final_number(answer, real) == {"valid": valid}


def test_last_number_reads_decimals_and_signs():
    assert last_number("from 3 to -4.25 degrees") == "-4.25" and last_number("none") is None


def arith_files(tmp_path, n_train: int, n_val: int) -> tuple[str, str]:
    """Short byte-tokenizer-sized conversations in the task's answer style."""
    r = random.Random(0)
    paths = []
    for name, n in (("train", n_train), ("val", n_val)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                a, b = r.randint(1, 20), r.randint(1, 20)
                conv = [{"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}]
                f.write(json.dumps({"messages": conv}) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.mark.parametrize("checker, scored", [("final_number", True), ("auto", False)])
def test_a_run_on_a_file_scores_held_out_answers_when_asked(tmp_path, checker, scored):
    train, val = arith_files(tmp_path, 16, 6)
    out = tmp_path / "out"
    assert run_in_process(*TINY, f"--out_dir={out}", f"--train_data={train}", f"--val_data={val}", "--stage=sft",
                          "--baseline_sft=False", "--max_iterations=0", "--eval_samples=6",
                          f"--checker={checker}") == 0
    end = [r for r in metrics(out) if r.get("phase") == "sft" and "eval/nll" in r][-1]
    if not scored:
        assert not any(k.startswith(("eval/valid", "per_prompt/")) for k in end)
        return
    for name in ("greedy", "sampled"):
        per_prompt = end[f"per_prompt/valid_{name}"]
        assert len(per_prompt) == 6 and set(per_prompt) <= {0, 1}
        assert end[f"eval/valid_{name}"] == pytest.approx(sum(per_prompt) / 6)


@pytest.mark.parametrize("override, message", [
    ("--checker=synthetic", "checker='synthetic' scores the synthetic task only"),
    ("--checker=numbers", "config key 'checker' is 'numbers'; use one of"),
])
def test_a_checker_that_cannot_score_the_data_is_a_start_up_error(tmp_path, capsys, override, message):
    train, val = arith_files(tmp_path, 4, 2)
    out = tmp_path / "never"
    assert run_in_process(*TINY, f"--out_dir={out}", f"--train_data={train}", f"--val_data={val}", override) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_the_task_is_seeded_and_keeps_held_out_questions_out_of_training():
    train, val = arith_task.split(200, 50, seed=3)
    assert (train, val) == arith_task.split(200, 50, seed=3)
    assert val == arith_task.split(400, 50, seed=3)[1]  # more training data keeps the same held-out set
    questions = [c[0]["content"] for c in train + val]
    assert len(set(questions)) == 250


def test_every_worked_answer_is_right_and_ends_in_its_result():
    train, val = arith_task.split(300, 0, seed=1)
    stories = set()
    for conv in train:
        answer = conv[1]["content"]
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", answer)
        assert len(equations) == 2, answer
        for a, op, b, c in equations:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                    "/": int(a) / int(b)}[op] == int(c), answer
        assert equations[0][3] in (equations[1][0], equations[1][2])  # the second step uses the first's result
        assert last_number(answer) == equations[1][3] and int(equations[1][3]) >= 0
        stories.add(conv[0]["content"].split()[-1])
    assert len(stories) >= 5  # several phrasings, not one surface form


def test_the_shipped_task_files_are_what_the_script_writes():
    """config/smollm_task.py trains on these files: `arith_task.py write` with its defaults must reproduce them."""
    train, val = arith_task.split(384, 128, seed=0)
    for name, convs in (("arith_train.jsonl", train), ("arith_val.jsonl", val)):
        with open(REPO / "experiments" / name) as f:
            assert [json.loads(line)["messages"] for line in f] == convs

"""Tests for data.py: masks, dataset formats (OpenAI, SPIN, NeMo with plain or header speakers, ShareGPT, NeMo-
Aligner's own file where present) and their errors, truncation counts, the sharded batch order, and the synthetic
task with its checker."""

import json
import os
from math import perm

import pytest
import torch

import data
import templates
from configurator import UserError, run_main
from hf_tokenizers import real_dir
from tokenizer import load_tokenizer


# -----------------------------------------------------------------------------
# Batches: masks


def test_collate_targets_cover_exactly_the_response():
    input_ids, targets = data.collate([[1, 2, 3], [7]], [[4, 5, 99], [8, 99]], pad_id=0)
    assert input_ids.dtype == targets.dtype == torch.int64 and input_ids.shape == (2, 5)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert targets.tolist() == [[-100, -100, 4, 5, 99], [8, 99, -100, -100, -100]]


@pytest.mark.parametrize("template", sorted(templates.NAMED))
def test_rendered_batch_masks_include_end_of_turn_and_exclude_prompt(template):
    tok = load_tokenizer("bytes")
    convs = data.synthetic_conversations(4, seed=3)
    examples, _ = data.examples_from_messages(convs, tok, template, max_len=128, max_prompt_len=96)
    input_ids, targets = data.collate([e.prompt_ids for e in examples], [e.real_ids for e in examples],
                                      tok.eos_id)
    eot = templates.end_of_turn_id(tok, template)
    for row, e in enumerate(examples):
        kept = targets[row][targets[row] != -100].tolist()
        assert kept == e.real_ids and kept[-1] == eot
        n = len(e.prompt_ids)
        assert (targets[row, : n - 1] == -100).all()  # prompt positions predict nothing
        assert input_ids[row, : n].tolist() == e.prompt_ids


# -----------------------------------------------------------------------------
# Datasets

MESSAGES = [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


def write_lines(path, lines) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))
    return str(path)


def header(role: str) -> str:
    """A speaker name as NeMo-Aligner's Llama-3-format SPIN data writes it."""
    return f"<|start_header_id|>{role}<|end_header_id|>"


def files_in_every_format(tmp_path) -> dict[str, str]:
    """MESSAGES as a record of each supported format (the SPIN one with a generated response 'five')."""
    listed = tmp_path / "d.json"
    listed.write_text("[\n" + json.dumps({"messages": MESSAGES}) + ",\n\n  " + json.dumps({"real": MESSAGES}) + "\n]\n")
    return {
        "openai": write_lines(tmp_path / "a.jsonl", [json.dumps({"messages": MESSAGES})]),
        "spin": write_lines(tmp_path / "b.jsonl", [json.dumps({
            "real": MESSAGES, "generated": MESSAGES[:2] + [{"role": "assistant", "content": "five"}]})]),
        "nemo": write_lines(tmp_path / "c.jsonl", [json.dumps({"system": "sys", "mask": "User", "conversations": [
            {"from": "User", "value": "2+2?"}, {"from": "Assistant", "value": "4"}]})]),
        "nemo headers": write_lines(tmp_path / "h.jsonl", [json.dumps({
            "system": "sys", "mask": header("user"), "dataset": "x", "conversations": [
                {"from": header("user"), "value": "2+2?"}, {"from": header("assistant"), "value": "4"}]})]),
        "sharegpt": write_lines(tmp_path / "g.jsonl", [json.dumps({"conversations": [
            {"from": "system", "value": "sys"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]})]),
        "json list": str(listed),
    }


def test_every_format_gives_the_same_example(tmp_path):
    tok = load_tokenizer("bytes")
    loaded = {name: data.load_examples(path, tok, "chatml", 64, 48)[0]
              for name, path in files_in_every_format(tmp_path).items()}
    reference = loaded["openai"][0]
    for examples in loaded.values():
        for e in examples:
            assert (e.prompt_ids, e.real_ids, e.prompt_messages) == (
                reference.prompt_ids, reference.real_ids, reference.prompt_messages)


def nemo_header_records(n: int) -> list[str]:
    """n records shaped as NeMo-Aligner's SPIN CI file: header-string speakers and mask, an empty system, a dataset
    name, 1 to 3 exchanges of varied text."""
    texts = ["Explain recursion.", "  spaces and\nnewlines\n", "日本語 😀", "code:\n\tdef f(x):\n\t\treturn x",
             "'quotes' \"x\""]
    records = []
    for i in range(n):
        turns = []
        for k in range(1 + i % 3):
            turns += [{"from": header("user"), "value": f"{texts[(i + k) % 5]} #{i}.{k}"},
                      {"from": header("assistant"), "value": f"answer {i}.{k}: {texts[(i + 2 * k) % 5]}"}]
        records.append(json.dumps({"system": "", "mask": header("user"), "dataset": "synthetic",
                                   "conversations": turns}))
    return records


def test_nemo_header_speakers_load_as_the_roles_inside(tmp_path):
    tok = load_tokenizer("bytes")
    path = write_lines(tmp_path / "spin.jsonl", nemo_header_records(512))
    examples, stats = data.load_examples(path, tok, "llama3", 512, 384)
    assert stats.n_examples == 512 and stats.n_invalid_skipped == 0
    for line, e in zip(nemo_header_records(512), examples):
        turns = json.loads(line)["conversations"]
        roles = ["user" if t["from"] == header("user") else "assistant" for t in turns]
        # an empty 'system' adds no system turn; each message keeps its turn's text
        assert e.prompt_messages == [{"role": r, "content": t["value"]} for r, t in zip(roles, turns)][:-1]
        assert e.real_text == turns[-1]["value"]
        assert e.prompt_ids == templates.render_prompt(tok, e.prompt_messages, "llama3")[-384:]


def test_speaker_roles():
    assert [data.speaker_role(s) for s in ("User", "human", "GPT", "Assistant", header("system"), "<extra_id_1>User",
                                           "Robot", None, 3)] == ["user", "user", "assistant", "assistant", "system",
                                                                  "user", None, None, None]


def test_nemo_aligner_data_loads_every_record():
    path = os.path.join(real_dir("chat_data"), "nemo_aligner_dummy-sft.jsonl")
    tok = load_tokenizer("bytes")
    examples, stats = data.load_examples(path, tok, "chatml", 100_000, 90_000)
    assert stats.n_examples == stats.n_read == 30
    records = [json.loads(line) for line in open(path)]
    for record, e in zip(records, examples):
        assert e.real_text == record["conversations"][-1]["value"] and len(e.prompt_messages) == \
            len(record["conversations"]) - 1 + bool(record["system"])


def test_example_keeps_its_source_line_text_and_prompt_messages(tmp_path):
    path = files_in_every_format(tmp_path)["openai"]
    (example,), _ = data.load_examples(path, load_tokenizer("bytes"), "chatml", 64, 48)
    assert (example.source, example.real_text, example.prompt_messages) == (f"{path}:1", "4", MESSAGES[:2])
    assert example.generated_ids is None


def test_spin_format_keeps_its_generated_response(tmp_path):
    tok = load_tokenizer("bytes")
    (example,), _ = data.load_examples(files_in_every_format(tmp_path)["spin"], tok, "chatml", 64, 48)
    assert example.generated_ids == templates.render_response(tok, "five", "chatml")


def test_json_list_records_are_named_by_their_line(tmp_path):
    path = files_in_every_format(tmp_path)["json list"]
    examples, _ = data.load_examples(path, load_tokenizer("bytes"), "chatml", 64, 48)
    assert [e.source for e in examples] == [f"{path}:2", f"{path}:4"]


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    tok = load_tokenizer("bytes")
    record = json.dumps({"messages": MESSAGES}).encode()
    plain = write_lines(tmp_path / "plain.jsonl", [record + b"\n"])
    marked = write_lines(tmp_path / "marked.jsonl", [b"\xef\xbb\xbf" + record + b"\n"])
    (expected,), _ = data.load_examples(plain, tok, "chatml", 64, 48)
    (example,), _ = data.load_examples(marked, tok, "chatml", 64, 48)
    assert (example.prompt_ids, example.real_ids) == (expected.prompt_ids, expected.real_ids)


BAD_RECORDS = {
    "bad JSON": ('{"messages": [', "bad JSON"),
    "not an object": ('[1, 2]', "must be a JSON object"),
    "unknown format": ('{"text": "hi"}', "unrecognised record"),
    "unknown role": (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
    "non-string content": (json.dumps({"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": 4}]}), "must be a string"),
    "no assistant turn": (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    "no user turn": (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "no user message"),
    "empty response": (json.dumps({"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "  "}]}), "empty assistant response"),
    "wrong encoding": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "not valid UTF-8"),
    "lone surrogate": ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
                       "not valid Unicode"),
    "unknown speaker": (json.dumps({"conversations": [{"from": "Robot", "value": "x"}]}), "unknown speaker"),
    "unknown header speaker": (json.dumps({"conversations": [{"from": header("robot"), "value": "x"}]}),
                               "unknown speaker '<|start_header_id|>robot"),
    "mask is the assistant": (json.dumps({"mask": header("assistant"), "conversations": [
        {"from": header("user"), "value": "q"}, {"from": header("assistant"), "value": "a"}]}), "not the user"),
    "SteerLM value type": (json.dumps({"type": "VALUE_TO_TEXT", "conversations": [
        {"from": "User", "value": "q"}, {"from": "Assistant", "value": "a", "label": "quality:4"}]}),
                           "SteerLM record of type 'VALUE_TO_TEXT'"),
    "assistant first": (json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                                 {"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}),
                        "messages[0]: 'assistant' where 'user' belongs"),
    "two users in a row": (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a"}]}),
                           "messages[1]: 'user' where 'assistant' belongs"),
    "system mid-conversation": (json.dumps({"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "system", "value": "s"},
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
                                "conversations[2]: a system message after the first"),
    "ShareGPT tool turn": (json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                         {"from": "function_call", "value": "{}"}]}),
                           "unknown speaker 'function_call'"),
    "generated prompt differs": (json.dumps({"real": MESSAGES, "generated": [
        {"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]}), "different prompt"),
}


def file_with_bad_record(tmp_path, case: str) -> str:
    """Line 3 holds the bad record, between two good ones and after a blank line."""
    good = json.dumps({"messages": MESSAGES})
    return write_lines(tmp_path / "d.jsonl", [good, "", BAD_RECORDS[case][0], good])


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_malformed_record_names_file_and_line(tmp_path, case):
    path = file_with_bad_record(tmp_path, case)
    with pytest.raises(UserError) as err:
        data.load_examples(path, load_tokenizer("bytes"), "chatml", 64, 48)
    assert str(err.value).startswith(f"{path}:3: ") and BAD_RECORDS[case][1] in str(err.value)
    assert "skip_invalid=True" in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_malformed_record_is_skipped_and_counted_with_skip_invalid(tmp_path, case):
    path = file_with_bad_record(tmp_path, case)
    examples, stats = data.load_examples(path, load_tokenizer("bytes"), "chatml", 64, 48, skip_invalid=True)
    assert len(examples) == 2 and [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert (stats.n_read, stats.n_invalid_skipped, stats.n_examples) == (3, 1, 2)
    assert "1 invalid skipped" in stats.summary() and f"{path}:3" in stats.summary()


def test_steerlm_labels_are_ignored_and_undesirable_kto_responses_are_skipped_and_counted(tmp_path):
    """NeMo's SteerLM labels (on turns, no value-conditioned 'type') do not change the example; a KTO-style label
    false, on the record or on its response, is never trained on as a real response."""
    tok = load_tokenizer("bytes")
    nemo = {"system": "sys", "mask": "User", "conversations": [{"from": "User", "value": "2+2?"},
                                                               {"from": "Assistant", "value": "4"}]}
    labelled = json.loads(json.dumps(nemo))
    labelled["conversations"][1]["label"] = "quality:4,toxicity:0,humor:0,creativity:0"
    undesirable = [{"messages": MESSAGES, "label": False},
                   {"messages": MESSAGES[:2] + [{**MESSAGES[2], "label": False}]},
                   {"prompt": MESSAGES[:2], "completion": MESSAGES[2:], "label": False}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in [nemo, labelled, *undesirable,
                                                                      {"messages": MESSAGES, "label": True}]])
    examples, stats = data.load_examples(path, tok, "chatml", 64, 48)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2", f"{path}:6"]
    assert examples[0].real_ids == examples[1].real_ids == examples[2].real_ids
    assert examples[0].prompt_ids == examples[1].prompt_ids == examples[2].prompt_ids
    assert (stats.n_read, stats.n_undesirable, stats.n_invalid_skipped, stats.n_examples) == (6, 3, 0, 3)
    assert "3 undesirable responses (KTO label false) skipped" in stats.summary()


def test_a_multi_turn_records_response_is_its_last_assistant_turn(tmp_path):
    """The response's ids are the last assistant turn's and its end-of-turn; every earlier turn is in the prompt."""
    turns = [{"role": "system", "content": "sys"}, {"role": "user", "content": "first question"},
             {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"},
             {"role": "assistant", "content": "second answer"}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": turns})])
    tok = load_tokenizer("bytes")
    (example,), _ = data.load_examples(path, tok, "chatml", 256, 200)
    assert example.real_ids == tok.encode("second answer") + [tok.specials["<|im_end|>"]]
    assert example.prompt_ids == tok.encode(
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nfirst question<|im_end|>\n<|im_start|>assistant\n"
        "first answer<|im_end|>\n<|im_start|>user\nsecond question<|im_end|>\n<|im_start|>assistant\n", special=True)
    assert (example.real_text, example.prompt_messages) == ("second answer", turns[:-1])


def test_a_record_its_chat_template_refuses_names_its_line_and_can_be_skipped(tmp_path):
    fussy = {"name": "fussy", "jinja": "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception("
                                       "'no booms') }}{% endif %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
                                       "{% if add_generation_prompt %}assistant: {% endif %}"}
    boom = [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "a"}]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": MESSAGES}), json.dumps({"messages": boom})])
    with pytest.raises(UserError, match=f"{path}:2: chat template 'fussy' failed .*no booms"):
        data.load_examples(path, load_tokenizer("bytes"), fussy, 64, 48)
    examples, stats = data.load_examples(path, load_tokenizer("bytes"), fussy, 64, 48, skip_invalid=True)
    assert len(examples) == 1 and stats.n_invalid_skipped == 1


def test_json_list_bad_record_names_its_line_and_can_be_skipped(tmp_path):
    tok = load_tokenizer("bytes")
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps({"messages": MESSAGES}) + ",\n" +
                    json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n]")
    with pytest.raises(UserError, match=f"{path}:3: .*unknown role"):
        data.load_examples(str(path), tok, "chatml", 64, 48)
    examples, stats = data.load_examples(str(path), tok, "chatml", 64, 48, skip_invalid=True)
    assert len(examples) == 1 and stats.n_invalid_skipped == 1


def test_json_list_with_bad_json_cannot_be_skipped(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps({"messages": MESSAGES}) + ",\n{\"messages\": oops}\n]")
    with pytest.raises(UserError, match=f"{path}:3: bad JSON"):
        data.load_examples(str(path), load_tokenizer("bytes"), "chatml", 64, 48, skip_invalid=True)


def test_json_file_must_be_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"messages": MESSAGES}))
    with pytest.raises(UserError, match=f"{path}:1: expected a JSON list"):
        data.load_examples(str(path), load_tokenizer("bytes"), "chatml", 64, 48)


def test_data_errors_exit_with_code_2_and_one_line(tmp_path, capsys):
    tok = load_tokenizer("bytes")
    path = write_lines(tmp_path / "d.jsonl", ['{"messages": 3}'])
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: data.load_examples(path, tok, "chatml", 64, 48))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:1:" in err


def test_missing_data_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load_examples(str(tmp_path / "missing.jsonl"), load_tokenizer("bytes"), "chatml", 64, 48)


def test_file_without_examples_is_refused(tmp_path):
    empty = write_lines(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(UserError, match="no usable examples"):
        data.load_examples(empty, load_tokenizer("bytes"), "chatml", 64, 48)


def test_truncate_keeps_the_prompt_end_and_cuts_the_response():
    assert data.truncate([1, 2, 3, 4], [5, 6, 7], max_len=5, max_prompt_len=3) == ([2, 3, 4], [5, 6])
    assert data.truncate([1, 2, 3], [4], max_len=3, max_prompt_len=3) is None  # no room for a response


# max_len 40, max_prompt_len 30: the first fits, the second's prompt and the third's response are cut
TRUNCATION_CASES = [[{"role": "user", "content": "u" * 10}, {"role": "assistant", "content": "a" * 5}],
                    [{"role": "user", "content": "u" * 40}, {"role": "assistant", "content": "a" * 5}],
                    [{"role": "user", "content": "u" * 10}, {"role": "assistant", "content": "a" * 40}]]


def test_long_prompt_keeps_its_end():
    tok = load_tokenizer("bytes")
    examples, _ = data.examples_from_messages(TRUNCATION_CASES, tok, "plain", max_len=40, max_prompt_len=30)
    assert examples[1].prompt_ids == templates.render_prompt(tok, TRUNCATION_CASES[1][:1], "plain")[-30:]
    assert examples[1].real_ids == templates.render_response(tok, "a" * 5, "plain")


def test_cut_response_loses_its_end_of_turn():
    tok = load_tokenizer("bytes")
    examples, _ = data.examples_from_messages(TRUNCATION_CASES, tok, "plain", max_len=40, max_prompt_len=30)
    assert examples[2].real_ids == templates.render_response(tok, "a" * 40, "plain")[: 40 - len(examples[2].prompt_ids)]
    assert examples[2].real_ids[-1] != tok.eos_id
    assert examples[0].real_ids[-1] == tok.eos_id


def test_examples_fit_max_len_and_truncation_is_counted():
    tok = load_tokenizer("bytes")
    examples, stats = data.examples_from_messages(TRUNCATION_CASES, tok, "plain", max_len=40, max_prompt_len=30)
    assert all(len(e.prompt_ids) + len(e.real_ids) <= 40 for e in examples)
    assert (stats.n_prompt_truncated, stats.n_response_truncated, stats.n_dropped) == (1, 1, 0)


def test_prompt_leaving_no_room_is_dropped_and_counted():
    tok = load_tokenizer("bytes")
    examples, stats = data.examples_from_messages(TRUNCATION_CASES, tok, "plain", max_len=30, max_prompt_len=30)
    assert stats.n_dropped == 1 and len(examples) == 2
    assert "1 dropped" in stats.summary()


def test_generated_responses_are_truncated_like_real_ones(tmp_path):
    tok = load_tokenizer("bytes")
    record = {"real": MESSAGES, "generated": MESSAGES[:2] + [{"role": "assistant", "content": "x" * 50}]}
    path = write_lines(tmp_path / "s.jsonl", [json.dumps(record)])
    (example,), stats = data.load_examples(path, tok, "chatml", 64, 48)
    assert len(example.prompt_ids) + len(example.generated_ids) == 64
    assert stats.n_generated_truncated == 1


# -----------------------------------------------------------------------------
# Batches: the sharded order


def epoch_batches(order: data.BatchOrder) -> list[list[int]]:
    return [order.next_batch() for _ in range(order.batches_per_epoch())]


N, BATCH_SIZE, WORLD_SIZE = 23, 2, 3


def epoch_per_rank(drop_last: bool) -> list[list[list[int]]]:
    """One epoch of N examples as each of WORLD_SIZE ranks sees it."""
    return [epoch_batches(data.BatchOrder(N, BATCH_SIZE, rank=r, world_size=WORLD_SIZE, seed=5, drop_last=drop_last))
            for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_rank_gets_as_many_full_batches(drop_last):
    per_rank = epoch_per_rank(drop_last)
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batch) == BATCH_SIZE for batches in per_rank for batch in batches)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_are_disjoint_within_a_global_batch(drop_last):
    per_rank = epoch_per_rank(drop_last)
    for step in range(len(per_rank[0])):
        parts = [set(batches[step]) for batches in per_rank]
        assert sum(len(p) for p in parts) == len(set().union(*parts))


@pytest.mark.parametrize("drop_last", [True, False])
def test_an_epoch_covers_the_data(drop_last):
    seen = [i for batches in epoch_per_rank(drop_last) for batch in batches for i in batch]
    if drop_last:
        assert len(seen) == len(set(seen)) == (N // (BATCH_SIZE * WORLD_SIZE)) * BATCH_SIZE * WORLD_SIZE
    else:
        assert set(seen) == set(range(N))  # the last global batch wraps around to fill every rank


def test_two_ranks_see_the_global_batches_of_one_rank_with_double_batch():
    single = data.BatchOrder(50, 8, seed=3)
    pair = [data.BatchOrder(50, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3 * single.batches_per_epoch() + 2):  # across several epochs
        assert single.next_batch() == pair[0].next_batch() + pair[1].next_batch()
    assert single.epoch == pair[0].epoch == 3


def order_state_after_17_batches() -> dict:
    order = data.BatchOrder(40, 3, seed=11)
    for _ in range(17):
        order.next_batch()
    return json.loads(json.dumps(order.state_dict()))  # survives a checkpoint


def test_resumed_order_continues_identically():
    state = order_state_after_17_batches()
    uninterrupted = data.BatchOrder(40, 3, seed=11)
    for _ in range(17):
        uninterrupted.next_batch()
    resumed = data.BatchOrder(40, 3, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(30)] == [uninterrupted.next_batch() for _ in range(30)]


def test_order_resumes_on_another_world_size_with_the_same_global_batch():
    state = order_state_after_17_batches()
    one_rank = data.BatchOrder(40, 3, seed=11)
    one_rank.load_state_dict(state)
    rank_0_of_3 = data.BatchOrder(40, 1, rank=0, world_size=3, seed=11)
    rank_0_of_3.load_state_dict(state)
    assert rank_0_of_3.next_batch() == one_rank.next_batch()[:1]


def test_resuming_with_other_data_or_seed_is_refused():
    state = order_state_after_17_batches()
    with pytest.raises(UserError, match="seed"):
        data.BatchOrder(40, 3, seed=12).load_state_dict(state)
    with pytest.raises(UserError, match="n="):
        data.BatchOrder(41, 3, seed=11).load_state_dict(state)


def test_order_is_seeded():
    first = epoch_batches(data.BatchOrder(30, 30, seed=0))
    assert epoch_batches(data.BatchOrder(30, 30, seed=0)) == first
    assert epoch_batches(data.BatchOrder(30, 30, seed=1)) != first


def test_order_is_reshuffled_each_epoch():
    order = data.BatchOrder(30, 30, seed=0)
    first = epoch_batches(order)
    assert epoch_batches(order) != first and sorted(order.global_batch(1, 0)) == list(range(30))


def test_dataset_smaller_than_a_global_batch_is_refused():
    with pytest.raises(UserError, match="fewer than one global batch"):
        data.BatchOrder(5, 4, world_size=2)


# -----------------------------------------------------------------------------
# Synthetic task


@pytest.fixture(scope="module")
def split():
    return data.synthetic_split(seed=0, n_train=2000, n_val=128)


def test_synthetic_conversations_are_seeded():
    assert data.synthetic_conversations(50, seed=4) == data.synthetic_conversations(50, seed=4)
    assert data.synthetic_conversations(50, seed=4) != data.synthetic_conversations(50, seed=5)


def test_synthetic_split_is_seeded_and_sized(split):
    train, val = split
    assert (len(train), len(val)) == (2000, 128)
    assert (train, val) == data.synthetic_split(seed=0, n_train=2000, n_val=128)
    assert val != data.synthetic_split(seed=1, n_train=2000, n_val=128)[1]


def test_held_out_prompts_are_distinct_and_never_trained_on(split):
    train, val = split
    val_prompts = [c[0]["content"] for c in val]
    assert len(set(val_prompts)) == len(val_prompts)
    assert not set(val_prompts) & {c[0]["content"] for c in train}


def test_training_prompts_are_drawn_from_all_the_others(split):
    train, val = split
    train_prompts = {c[0]["content"] for c in train}
    others = {data.synthetic_prompt(s) for s in data.synthetic_specs()} - {c[0]["content"] for c in val}
    assert train_prompts <= others and len(train_prompts) > 0.9 * len(others)


def test_synthetic_conversations_are_a_short_user_turn_and_answer(split):
    train, val = split
    for user, assistant in train + val:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert len(user["content"]) <= 40 and len(assistant["content"]) <= 40


def test_holding_out_more_than_half_the_prompts_is_refused():
    with pytest.raises(UserError, match="distinct prompts"):
        data.synthetic_split(seed=0, n_train=10, n_val=len(data.synthetic_specs()))


def test_checker_accepts_every_real_answer():
    for user, assistant in data.synthetic_conversations(3000, seed=6):
        scores = data.check_answer(user["content"], assistant["content"])
        assert scores == {"format": 1.0, "count": 1.0, "digits": 1.0, "distinct": 1.0, "valid": 1.0}


def test_every_prompt_has_many_valid_answers():
    for k, digits in data.synthetic_specs():
        assert perm(len(digits) ** 2, k) >= 504  # k-permutations: a sample equals the real answer rarely


def test_a_repeated_prompt_rarely_repeats_its_answer():
    by_prompt = {}
    for user, assistant in data.synthetic_conversations(3000, seed=6):
        by_prompt.setdefault(user["content"], []).append(assistant["content"])
    repeats = sum(len(a) - len(set(a)) for a in by_prompt.values())
    assert repeats <= 10, repeats


def test_checker_finds_the_prompt_inside_a_rendered_conversation():
    tok = load_tokenizer("bytes")
    user, assistant = data.synthetic_conversations(1, seed=6)[0]
    rendered = tok.decode(templates.render_prompt(tok, [user], "chatml"))
    assert data.check_answer(rendered, assistant["content"])["valid"] == 1.0


ALL_CRITERIA = ["format", "count", "digits", "distinct"]


@pytest.mark.parametrize("answer, failed", [
    ("14 71 44", []),
    ("11 77 47", []),
    ("14 71", ["count"]),
    ("14 71 44 77", ["count"]),
    ("14 72 44", ["digits"]),
    ("14 7 44", ["digits"]),
    ("14 147 44", ["digits"]),
    ("14 71 14", ["distinct"]),
    ("14 14", ["count", "distinct"]),
    ("14, 71, 44", ALL_CRITERIA),
    ("14 71 44 ", ALL_CRITERIA),
    ("14  71 44", ALL_CRITERIA),
    ("", ALL_CRITERIA),
    ("fourteen", ALL_CRITERIA),
])
def test_checker_rejects_wrong_answers(answer, failed):
    scores = data.check_answer("3 distinct 2-digit numbers, digits 147", answer)
    assert {k for k, v in scores.items() if v == 0.0} == set(failed) | ({"valid"} if failed else set())


def test_checker_reads_the_count_and_digits_of_its_prompt():
    prompt = "6 distinct 2-digit numbers, digits 2589"
    assert data.check_answer(prompt, "22 58 95 89 99 25")["valid"] == 1.0
    assert data.check_answer(prompt, "22 58 95 89 99 21")["digits"] == 0.0


def test_checker_refuses_text_that_is_not_its_prompt():
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        data.check_answer("what is 2+2?", "4")

"""packing.py and the packed path through model.py and spin.py: a document's layout (positions as unpacked),
first-fit rows, packed log-probs and every parameter gradient equal to the unpacked ones (GPT-2 and Llama/GQA,
SDPA and Triton in the interpreter, with and without a sliding window), no cross-contamination between the
documents of a row, and the Triton path never falling back to SDPA."""

import pytest
import torch
import torch.nn.functional as F

import spin_kernels.attention as attention_module
from model import GPT, GPTConfig
from packing import first_fit_rows, pack_documents, response_logps
from spin import pair_logps, sequence_logps

CPU = torch.device("cpu")


def tiny_model(model_type: str, attention: str = "sdpa", sliding_window: int | None = None) -> GPT:
    torch.manual_seed(0)
    n_kv_head = 1 if model_type == "llama" else 2  # Llama with grouped-query attention, 2:1
    model = GPT(GPTConfig(model_type=model_type, vocab_size=97, block_size=48, n_layer=2, n_head=2,
                          n_kv_head=n_kv_head, n_embd=32, attention=attention, sliding_window=sliding_window))
    with torch.no_grad():  # away from the near-uniform init, so a misplaced token shows in the log-probs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_pairs(n: int, seed: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Ragged prompts (1-12 tokens), real and generated responses (1-14 tokens; prompt + response <= 26)."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return torch.randint(0, 97, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen).tolist()
    prompts = [tokens(1, 12) for _ in range(n)]
    return prompts, [tokens(1, 14) for _ in range(n)], [tokens(1, 14) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# the layout


def test_a_pair_is_its_prompt_once_then_each_response_with_the_unpacked_positions():
    batch = pack_documents([([1, 2, 3], [[4, 5], [6, 7, 8]])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 3, 6, 7]]  # prompt[:-1], then prompt[-1] + response[:-1] each
    assert batch.targets.tolist() == [[-100, -100, 4, 5, 6, 7, 8]]
    layout = batch.layout
    assert layout.positions.tolist() == [[0, 1, 2, 3, 2, 3, 4]]  # as in 1 2 3 4 5 and 1 2 3 6 7 8
    assert layout.segments.tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    assert layout.doc_starts.tolist() == [[0] * 7] and layout.doc_ends.tolist() == [[7] * 7]
    assert batch.response_tokens.tolist() == [[2, 3, 7], [4, 5, 6]]  # 7 = B*T: the slot that holds 0


def test_documents_share_rows_first_fit_and_padding_is_one_token_documents():
    documents = [([1, 2], [[3]]), ([4], [[5, 6, 7], [8]]), ([9, 10, 11], [[12]]), ([13], [[]])]
    assert first_fit_rows([2, 4, 3, 0], 4) == [[1, 3], [2], [0]]  # longest first, each into the first row with room
    batch = pack_documents(documents, pad_id=99)  # lengths 2, 4, 3, 0: rows of at most 4 tokens
    assert batch.input_ids.tolist() == [[4, 5, 6, 4], [9, 10, 11, 99], [1, 2, 99, 99]]
    assert batch.layout.doc_starts.tolist() == [[0, 0, 0, 0], [0, 0, 0, 3], [0, 0, 2, 3]]
    assert batch.layout.doc_ends.tolist() == [[4, 4, 4, 4], [3, 3, 3, 4], [2, 2, 3, 4]]
    token_logps = torch.arange(12, dtype=torch.float32).view(3, 4)
    # responses in document order: 3 at row 2 index 1; 5 6 7 and 8 at row 0; 12 at row 1 index 2; the empty one
    assert response_logps(token_logps, batch).tolist() == [9.0, 0.0 + 1.0 + 2.0, 3.0, 6.0, 0.0]
    with pytest.raises(ValueError, match="empty prompt"):
        pack_documents([([], [[1]])], pad_id=0)


def test_packing_several_pairs_per_row_cuts_the_rows():
    prompts, real, generated = random_pairs(16, seed=1)
    batch = pack_documents([(p, [r, g]) for p, r, g in zip(prompts, real, generated)], pad_id=0)
    longest = max(len(p) - 1 + len(r) + len(g) for p, r, g in zip(prompts, real, generated))
    assert batch.input_ids.shape[1] == longest and batch.input_ids.shape[0] < 16
    assert int((batch.targets != -100).sum()) == sum(len(r) + len(g) for r, g in zip(real, generated))


# ----------------------------------------------------------------------------------------------
# packed == unpacked


def logps_and_grads(model: GPT, prompts, real, generated, pack: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Real and generated log-probs, and every parameter's gradient of a loss that weighs each differently."""
    model.zero_grad(set_to_none=True)
    real_logps, generated_logps = pair_logps(model, prompts, real, generated, 0, CPU, pack=pack)
    weights = torch.linspace(-1.0, 2.0, 2 * len(prompts))
    (torch.cat([real_logps, generated_logps]) * weights).sum().backward()
    return real_logps.detach(), generated_logps.detach(), [p.grad.clone() for p in model.parameters()]


def assert_packed_equals_unpacked(model: GPT, n_pairs: int = 7, seed: int = 0) -> None:
    prompts, real, generated = random_pairs(n_pairs, seed)
    packed = logps_and_grads(model, prompts, real, generated, pack=True)
    unpacked = logps_and_grads(model, prompts, real, generated, pack=False)
    assert (packed[0] - unpacked[0]).abs().max() <= 1e-5 and (packed[1] - unpacked[1]).abs().max() <= 1e-5
    for (name, _), got, want in zip(model.named_parameters(), packed[2], unpacked[2]):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_packed_pair_logps_and_gradients_equal_unpacked_sdpa(model_type):
    assert_packed_equals_unpacked(tiny_model(model_type))


@pytest.mark.triton
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_packed_pair_logps_and_gradients_equal_unpacked_triton(model_type, monkeypatch):
    """The Triton kernels with the document mask (interpreted), and never a silent fall back to SDPA."""
    launched = []
    real_launch = attention_module.launch

    def counting_launch(kernel, *args, **meta):
        launched.append((kernel.__name__, meta.get("PACKED")))
        return real_launch(kernel, *args, **meta)

    monkeypatch.setattr(attention_module, "launch", counting_launch)
    model = tiny_model(model_type, attention="triton")
    prompts, real, generated = random_pairs(7, seed=0)
    packed = logps_and_grads(model, prompts, real, generated, pack=True)
    assert {("_attn_fwd_kernel", True), ("_attn_bwd_kernel", True)} <= set(launched)
    assert len([name for name, packed_rows in launched if name == "_attn_fwd_kernel"]) == model.config.n_layer

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran: the packed Triton path fell back")

    with monkeypatch.context() as patched:
        patched.setattr(F, "scaled_dot_product_attention", no_sdpa)
        logps_and_grads(model, prompts, real, generated, pack=True)
    reference = tiny_model(model_type)  # the same weights, SDPA, unpacked
    unpacked = logps_and_grads(reference, prompts, real, generated, pack=False)
    assert (packed[0] - unpacked[0]).abs().max() <= 1e-5 and (packed[1] - unpacked[1]).abs().max() <= 1e-5
    for (name, _), got, want in zip(model.named_parameters(), packed[2], unpacked[2]):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_packed_rows_keep_a_sliding_window_on_positions(attention):
    """Window 5 against responses of up to 14 tokens after prompts of up to 12: the window cuts inside every
    segment, and the packed rows (positions restart per response) still equal the unpacked ones."""
    assert_packed_equals_unpacked(tiny_model("llama", attention, sliding_window=5), n_pairs=5, seed=2)
    windowed, full = tiny_model("llama", sliding_window=5), tiny_model("llama")
    prompts, real, generated = random_pairs(5, seed=2)
    with torch.no_grad():
        assert (pair_logps(windowed, prompts, real, generated, 0, CPU)[0]
                - pair_logps(full, prompts, real, generated, 0, CPU)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_packed_sft_examples_equal_unpacked(model_type):
    model = tiny_model(model_type).eval()
    prompts, responses, _ = random_pairs(9, seed=4)
    with torch.no_grad():
        packed = sequence_logps(model, prompts, responses, 0, CPU, pack=True)
        unpacked = sequence_logps(model, prompts, responses, 0, CPU, pack=False)
    assert (packed - unpacked).abs().max() <= 1e-5


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_another_pair_in_the_row_changes_nothing(attention):
    """Three pairs in one row; the third pair's tokens changed: the first two pairs' log-probs stay bit-identical."""
    model = tiny_model("llama", attention).eval()
    prompts, real, generated = random_pairs(3, seed=5)

    def row_logps(generated_last: list[int]) -> torch.Tensor:
        documents = [(p, [r, g]) for p, r, g in zip(prompts, real, generated[:2] + [generated_last])]
        batch = pack_documents(documents, pad_id=0, row_len=200)
        assert batch.input_ids.shape[0] == 1  # all three in one row
        with torch.no_grad():
            return response_logps(model.token_logprobs(batch.input_ids, batch.targets, batch.layout), batch)

    before = row_logps(generated[2])
    after = row_logps([(t + 7) % 97 for t in generated[2]])
    assert torch.equal(before[:4], after[:4])
    assert not torch.equal(before[4:], after[4:])

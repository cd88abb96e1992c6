"""Packed rows: several documents share a row, and a prompt is run once for all the responses scored against it.

A document is one prompt with its responses: a SPIN pair (real, generated) or an SFT example (real). In a row
it is laid out as segments, the shared prompt (segment 0) then one segment per response:

    prompt[:-1] | prompt[-1] real[:-1] | prompt[-1] generated[:-1]      targets: real, then generated

Each response segment begins with its own copy of the prompt's last token (whose output predicts the response's
first token) and its positions continue from the prompt: len(prompt)-1, len(prompt), ... as in the unpacked row
prompt + response, so RoPE and learned positions, and thus every log-prob, equal the unpacked ones.

Design choices:
- The mask rule (`visible_mask`, the spec that spin_kernels/attention.py implements): query i may attend to key j iff
  both are in the same document, j <= i in the row, and j is in the prompt segment or in i's own segment; with a
  sliding window also position_i - position_j < window. Every token sees itself, so no row of the mask is empty:
  padding tokens are one-token documents of their own.
- A document's id is the index of its first token in the row (`doc_starts`), so a kernel also knows where a
  query's keys begin; `doc_ends` says where the document ends (past its last query).
- Rows are filled first-fit decreasing up to the longest document, the length an unpacked batch pads to anyway:
  no row grows longer, short documents share rows. (Longer rows would only add masked-out work in SDPA.)
- Per-response sums are a gather of each response's token log-probs then a sum: deterministic on every device
  (no atomics), and gradients reach each token as in the unpacked path.
- data.py's `collate` (one prompt + response per row, padded) stays the unpacked reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch


@dataclass
class RowLayout:
    """Per-token ids of packed rows, each (B, T) int32."""
    positions: torch.Tensor  # position in the unpacked sequence (RoPE / learned positions, window distances)
    doc_starts: torch.Tensor  # the document id: the index of its first token in the row
    doc_ends: torch.Tensor  # one past the document's last token
    segments: torch.Tensor  # 0: the document's prompt, s >= 1: its s-th response

    def to(self, device: torch.device) -> RowLayout:
        return RowLayout(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    @functools.cached_property
    def kernel_ids(self) -> torch.Tensor:
        """(B, 4, T) int32 as the Triton attention kernels read them: document start, document end, segment,
        position; made once per layout, for every layer of a forward and its backward."""
        parts = (self.doc_starts, self.doc_ends, self.segments, self.positions)
        return torch.stack([part.to(torch.int32) for part in parts], dim=1).contiguous()


@dataclass
class PackedBatch:
    """A packed batch: what the model reads, and where each response's target tokens are."""
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, -100 outside responses
    layout: RowLayout
    response_tokens: torch.Tensor  # (n_responses, L) int64: flat indices into (B*T,) of each response's targets,
    # B*T where a response is shorter than L (a slot that holds 0)

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                           self.layout.to(device), self.response_tokens.to(device, non_blocking=True))


def _document(prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """(input ids, targets, positions, segments) of one document, laid out as the module docstring says."""
    n = len(prompt) - 1
    inputs, targets, positions, segments = prompt[:-1], [-100] * n, list(range(n)), [0] * n
    for s, response in enumerate(responses, 1):
        inputs = inputs + (prompt[-1:] + response)[:len(response)]
        targets = targets + response
        positions = positions + list(range(n, n + len(response)))
        segments = segments + [s] * len(response)
    return inputs, targets, positions, segments


def first_fit_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Documents (by index) per row: longest first, each into the first row with room (first-fit decreasing)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for d in sorted(range(len(lengths)), key=lambda d: -lengths[d]):
        row = next((r for r, u in enumerate(used) if u + lengths[d] <= row_len), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(d)
        used[row] += lengths[d]
    return rows


def _row(documents: list[tuple[list[int], list[int], list[int], list[int]]], T: int,
         pad_id: int) -> list[list[int]]:
    """One row's columns, padded to T: input ids, targets, positions, segments, document starts and ends."""
    columns: list[list[int]] = [[] for _ in range(6)]
    for inputs, targets, positions, segments in documents:
        start, end = len(columns[0]), len(columns[0]) + len(inputs)
        for column, values in zip(columns, (inputs, targets, positions, segments, [start] * len(inputs),
                                            [end] * len(inputs))):
            column += values
    used, n = len(columns[0]), T - len(columns[0])
    # padding: one-token documents, so a pad query sees itself only
    for column, fill in zip(columns, ([pad_id] * n, [-100] * n, [0] * n, [0] * n, range(used, T),
                                      range(used + 1, T + 1))):
        column += fill
    return columns


def pack_documents(documents: list[tuple[list[int], list[list[int]]]], pad_id: int,
                   row_len: int | None = None) -> PackedBatch:
    """Pack (prompt, responses) documents into rows of at most row_len tokens (default: the longest document).
    Responses are numbered in document order: document k's j-th response comes after all earlier documents'."""
    if not documents:
        raise ValueError("pack_documents needs at least one document")
    if any(len(prompt) == 0 for prompt, _ in documents):
        raise ValueError("pack_documents: an empty prompt leaves nothing to predict the first response token from")
    laid_out = [_document(prompt, responses) for prompt, responses in documents]
    lengths = [len(inputs) for inputs, _, _, _ in laid_out]
    rows = first_fit_rows(lengths, max(row_len or 0, max(lengths)))
    T = max(max(sum(lengths[d] for d in row) for row in rows), 1)
    spans = {}  # (document, response) -> flat indices (first, last + 1) of the response's targets
    for b, row in enumerate(rows):
        start = b * T
        for d in row:
            first = start + len(documents[d][0]) - 1
            for j, response in enumerate(documents[d][1]):
                spans[d, j] = (first, first + len(response))
                first += len(response)
            start += lengths[d]
    ordered = [spans[d, j] for d, (_, responses) in enumerate(documents) for j in range(len(responses))]
    longest = max((last - first for first, last in ordered), default=0)
    response_tokens = torch.tensor([list(range(first, last)) + [len(rows) * T] * (longest - last + first)
                                    for first, last in ordered], dtype=torch.long).view(len(ordered), longest)
    ids, targets, positions, segments, starts, ends = zip(*(_row([laid_out[d] for d in row], T, pad_id)
                                                            for row in rows))
    layout = RowLayout(*(torch.tensor(column, dtype=torch.int32) for column in (positions, starts, ends, segments)))
    return PackedBatch(torch.tensor(ids), torch.tensor(targets), layout, response_tokens)


def response_logps(token_logps: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """token_logps (B, T), the model's log-probs of batch.targets -> (n_responses,) sums over each response."""
    flat = torch.cat([token_logps.reshape(-1), token_logps.new_zeros(1)])  # (B*T + 1,), the last slot holds 0
    return flat[batch.response_tokens].sum(-1)


def visible_mask(layout: RowLayout | None, T: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, T) bool, True = query i may attend to key j: causal, within a document (key in the prompt
    segment or the query's own), within the window. layout None: one causal sequence, positions 0..T-1."""
    index = torch.arange(T, device=device)
    visible = (index[:, None] >= index[None, :])[None]  # (1, T, T): key j not after query i
    positions = index[None]  # (1, T)
    if layout is not None:
        docs, segments = layout.doc_starts, layout.segments  # (B, T)
        same_doc = docs[:, :, None] == docs[:, None, :]
        shared_or_own = (segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :])
        visible = visible & same_doc & shared_or_own  # (B, T, T)
        positions = layout.positions
    if window is not None:
        visible = visible & (positions[:, :, None] - positions[:, None, :] < window)
    return visible[:, None]


def sdpa_mask(layout: RowLayout | None, T: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """The boolean mask (B or 1, 1, T, T) SDPA needs for packed rows or a window shorter than the rows (positions
    are never further apart than a row is long); None where plain causal attention is the same."""
    window = window if window is not None and window < T else None
    if layout is None and window is None:
        return None
    return visible_mask(layout, T, window, device)

"""The batched KV cache of the embedded engine's batched mode, and the forwards that run on it.

Tensors and transformers only: `embedded_engine.py` decides which requests run when.

Layout (`KVBatch`)
    Per layer, keys and values are one tensor each, [rows, kv_heads, capacity, head_dim], inside a
    transformers `Cache` whose layers write new columns in place (capacity grows in steps of
    `GROWTH_COLUMNS`), so a decode step appends a column instead of copying the whole cache as
    `DynamicCache`'s torch.cat does. All rows share the column axis. Row r's tokens are the last
    `lengths[r]` used columns, contiguous; the columns left of them are holes: zero-filled and masked.
    Removing rows or merging batches cuts the leading columns that are holes in every row, so the
    width is always the longest row's length.

Exactness (transformers 5.x, Llama / Qwen2 / Qwen3 with sdpa on CPU; read from their modeling code)
    These models take no `cache_position`; RoPE reads `position_ids` only, which we pass per row (the
    next token of row r is at position lengths[r]), so holes shift no position. The causal mask
    transformers would build from a 2-D padding mask compares column indices, and a padded query whose
    columns so far are all holes would attend to nothing (NaN out of sdpa). So we pass a prepared 4-D
    boolean mask, which `create_causal_mask` returns as-is: each query sees the valid columns of its
    own sequence up to itself. Holes hold zeros, never garbage: a masked column still enters
    probabilities @ values, and 0 × NaN would poison the row. Results equal a 1-row forward up to
    float rounding (other reduction orders), not bitwise. Models with sliding-window layers would get
    this full-attention mask on every layer, so `check_supported` refuses them.

Prefill (`PackedPrefill`)
    Newly admitted requests are prefilled packed into one row, without padding: their token sequences
    are concatenated, each attending causally within its own segment, positions restarting at 0 per
    segment. The group runs in chunks of a bounded number of tokens, one forward each; a chunk's
    queries see only the columns from the start of their first segment on (`_InPlaceLayer.visible_from`),
    so a big group costs no attention across segments. Logits are computed only at the last token of
    each sequence (`logits_to_keep`) and at the positions whose next-token log-prob a request asked for
    (prompt log-probs, `scored_positions`); those come back as log_softmax of the raw logits at the
    next token of the sequence, so a chunk never holds more than its own positions' logits. The segments that ended in a chunk are copied, right-aligned, into
    the rows of a new `KVBatch`, which the engine merges into its batch.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

GROWTH_COLUMNS = 32  # spare columns allocated at a time: one reallocation per 32 decode steps


def check_supported(config) -> str | None:
    """Why batched mode cannot serve a model with this config, or None when it can."""
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"it has {', '.join(other)} layers (batched mode builds full-attention masks)"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"its attention implementation is {implementation!r} (batched mode passes sdpa boolean masks)"
    return None


def num_layers(model) -> int:
    return int(model.config.get_text_config(decoder=True).num_hidden_layers)


class _InPlaceLayer(DynamicLayer):
    """One layer's keys and values, [rows, kv_heads, capacity, head_dim]; `update` writes in place.

    The buffers are allocated at the first update (their head shape comes from the model's keys).
    `update` returns the columns [visible_from, length), the keys a forward attends to.
    """

    def __init__(self, rows: int, capacity: int):
        super().__init__()
        self.rows = rows
        self.capacity = capacity
        self.length = 0
        self.visible_from = 0

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> _InPlaceLayer:
        layer = cls(keys.shape[0], keys.shape[2])
        layer.keys, layer.values, layer.length = keys, values, length
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.is_initialized = True
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            shape = (self.rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys = key_states.new_zeros(shape)
            self.values = value_states.new_zeros(shape[:3] + (value_states.shape[3],))
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        end = self.length + key_states.shape[2]
        if end > self.keys.shape[2]:
            capacity = end + GROWTH_COLUMNS
            self.keys = _placed(self.keys[:, :, :self.length], capacity)
            self.values = _placed(self.values[:, :, :self.length], capacity)
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, self.visible_from:end], self.values[:, :, self.visible_from:end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length - self.visible_from, self.visible_from


def _placed(columns: torch.Tensor, capacity: int) -> torch.Tensor:
    """`columns` [rows, heads, n, dim] at the start of a zero tensor of `capacity` columns."""
    shape = list(columns.shape)
    shape[2] = capacity
    placed = columns.new_zeros(shape)
    placed[:, :, :columns.shape[2]] = columns
    return placed


class KVBatch:
    """The keys and values of a batch of decoding sequences (see the module docstring)."""

    def __init__(self, layers: list[_InPlaceLayer], lengths: torch.Tensor):
        self.layers = layers
        self.cache = Cache(layers=layers)
        self.lengths = lengths  # int64 [rows]: tokens held per row

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        return self.layers[0].length

    def slots(self) -> int:
        """KV token slots in use: rows × width, holes included."""
        return self.rows * self.width

    def decode(self, model, token_ids: list[int]) -> torch.Tensor:
        """Run one token per row (row r's token at position lengths[r]); return float logits [rows, vocab]."""
        width = self.width
        columns = torch.arange(width + 1)
        visible = columns.unsqueeze(0) >= (width - self.lengths).unsqueeze(1)  # the new column is always visible
        output = model(
            input_ids=torch.tensor(token_ids, dtype=torch.long).unsqueeze(1),
            position_ids=self.lengths.unsqueeze(1).clone(),
            attention_mask=visible[:, None, None, :],
            past_key_values=self.cache, use_cache=True,
        )
        self.lengths += 1
        return output.logits[:, -1].float()

    def select(self, rows: list[int]) -> KVBatch | None:
        """A batch of these rows (in this order), without the leading columns that are holes in all of them."""
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long)
        lengths = self.lengths[index]
        width = int(lengths.max())
        start = self.width - width
        layers = [_InPlaceLayer.holding(
            _placed(layer.keys[index, :, start:self.width], width + GROWTH_COLUMNS),
            _placed(layer.values[index, :, start:self.width], width + GROWTH_COLUMNS), width)
            for layer in self.layers]
        return KVBatch(layers, lengths)

    @staticmethod
    def concat(first: KVBatch | None, second: KVBatch) -> KVBatch:
        """`first`'s rows then `second`'s, the narrower batch left-padded with holes."""
        if first is None or first.rows == 0:
            return second
        width = max(first.width, second.width)
        layers = []
        for a, b in zip(first.layers, second.layers):
            merged = []
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                shape = list(x.shape)
                shape[0] = first.rows + second.rows
                shape[2] = width + GROWTH_COLUMNS
                tensor = x.new_zeros(shape)
                tensor[:first.rows, :, width - a.length:width] = x[:, :, :a.length]
                tensor[first.rows:, :, width - b.length:width] = y[:, :, :b.length]
                merged.append(tensor)
            layers.append(_InPlaceLayer.holding(merged[0], merged[1], width))
        return KVBatch(layers, torch.cat([first.lengths, second.lengths]))


class PackedPrefill:
    """Sequences prefilled packed into one row, chunk by chunk (see the module docstring)."""

    def __init__(self, model, sequences: list[list[int]], scored_positions: list[range] | None = None):
        """`scored_positions[i]`: positions of sequence i (each < its length − 1) whose log-prob of the next
        token of the sequence is wanted."""
        self.lengths = [len(s) for s in sequences]
        self.starts = [0]
        for length in self.lengths[:-1]:
            self.starts.append(self.starts[-1] + length)
        self.total = sum(self.lengths)
        self.token_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
        self.segment = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(self.lengths))
        self.positions = torch.cat([torch.arange(n) for n in self.lengths])
        self.scored = torch.zeros(self.total, dtype=torch.bool)  # packed index: its next-token log-prob is wanted
        for start, positions in zip(self.starts, scored_positions or ()):
            if positions:
                self.scored[start + positions.start:start + positions.stop] = True
        self.layers = [_InPlaceLayer(1, self.total) for _ in range(num_layers(model))]
        self.cache = Cache(layers=self.layers)
        self.done = 0  # packed tokens processed

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def unfinished(self) -> range:
        """The segments whose last token has not been processed yet."""
        return range(int(self.segment[self.done]) if not self.finished else len(self.lengths), len(self.lengths))

    def _chunk_end(self, max_tokens: int | None) -> int:
        return self.total if max_tokens is None else min(self.total, self.done + max_tokens)

    def next_chunk(self, max_tokens: int | None) -> range:
        """The segments that have tokens in the next chunk."""
        return range(int(self.segment[self.done]), int(self.segment[self._chunk_end(max_tokens) - 1]) + 1)

    def forward_chunk(self, model, max_tokens: int | None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Process the next ≤ max_tokens packed tokens. Return {segment: float logits of its last token} for
        the segments that end in this chunk, and {segment: log-probs of the next tokens at its scored
        positions in this chunk, in order}."""
        start, end = self.done, self._chunk_end(max_tokens)
        segments = self.next_chunk(max_tokens)
        visible_from = self.starts[segments[0]]
        for layer in self.layers:
            layer.visible_from = visible_from
        causal = torch.arange(start, end).unsqueeze(1) >= torch.arange(visible_from, end).unsqueeze(0)
        mask = (self.segment[start:end].unsqueeze(1) == self.segment[visible_from:end].unsqueeze(0)) & causal
        ending = [s for s in segments if self.starts[s] + self.lengths[s] <= end]
        last = torch.tensor([self.starts[s] + self.lengths[s] - 1 - start for s in ending], dtype=torch.long)
        scored = torch.nonzero(self.scored[start:end]).squeeze(1)  # chunk-relative, never a last position
        keep = torch.cat([last, scored]).sort().values
        output = model(
            input_ids=self.token_ids[start:end].unsqueeze(0),
            position_ids=self.positions[start:end].unsqueeze(0),
            attention_mask=mask[None, None],
            past_key_values=self.cache, use_cache=True,
            logits_to_keep=keep if keep.numel() else 1,
        )
        self.done = end
        logits = output.logits[0].float()
        row = torch.searchsorted(keep, last)
        ended = {segment: logits[row[i]] for i, segment in enumerate(ending)}
        next_token_logprobs: dict[int, torch.Tensor] = {}
        if scored.numel():
            logprobs = torch.log_softmax(logits[torch.searchsorted(keep, scored)], dim=-1)
            chosen = logprobs.gather(1, self.token_ids[start + scored + 1].unsqueeze(1)).squeeze(1)
            chosen.clamp_(min=torch.finfo(torch.float32).min)
            owners = self.segment[start + scored]
            for segment in owners.unique().tolist():
                next_token_logprobs[segment] = chosen[owners == segment]
        return ended, next_token_logprobs

    def to_batch(self, segments: list[int]) -> KVBatch | None:
        """A KVBatch with one row per segment (in this order), each right-aligned."""
        if not segments:
            return None
        width = max(self.lengths[s] for s in segments)
        layers = []
        for layer in self.layers:
            placed = []
            for source in (layer.keys, layer.values):
                shape = list(source.shape)
                shape[0], shape[2] = len(segments), width + GROWTH_COLUMNS
                tensor = source.new_zeros(shape)
                for row, s in enumerate(segments):
                    n = self.lengths[s]
                    tensor[row, :, width - n:width] = source[0, :, self.starts[s]:self.starts[s] + n]
                placed.append(tensor)
            layers.append(_InPlaceLayer.holding(placed[0], placed[1], width))
        return KVBatch(layers, torch.tensor([self.lengths[s] for s in segments], dtype=torch.long))

    def slots(self) -> int:
        """KV token slots in use: the packed tokens processed so far."""
        return self.done

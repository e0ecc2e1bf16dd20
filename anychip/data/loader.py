"""Token batches for pretraining and SFT: packed, sharded across ranks, resumable.

Every rank builds the same global batch from the same example stream and keeps its own
rows, so the data a run sees depends only on the global batch size, never on the number
of processes, and one JSON-serialisable state (identical on all ranks) resumes it on any
number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)
MODES = ("pretrain", "sft")
STATE_VERSION = 1


def _source_size(source: Any) -> int | None:
    """Number of documents of a finite source, None for an unbounded one."""
    try:
        size = len(source)
    except TypeError:
        return None
    if size <= 0:
        raise ValueError(f"data source {source!r} is empty")
    return size


class TokenBatches:
    """Batches ``{"input_ids", "labels"}``, each a LongTensor ``[global_batch // world_size, seq_len]``.

    ``source`` is anything with ``example(i)`` (ReasoningTasks, JsonlCorpus, TextCorpus)
    or a sequence; a document is a ``str`` or has ``prompt`` and ``completion``. It becomes
    ``[bos] + encode(prompt) + encode(completion) + [eos]`` (text: ``[bos] + encode(text) +
    [eos]``). A finite source is cycled in order, epoch after epoch.

    ``mode="pretrain"``: every token is a target. Documents are concatenated into one stream
    and cut into windows of ``seq_len + 1`` tokens that overlap by one token (window k starts
    at stream position ``k * seq_len``), so no adjacent pair of tokens is lost;
    ``input_ids = w[:-1]``, ``labels = w[1:]``.

    ``mode="sft"``: only completion tokens and the eos are targets. Whole examples are packed
    greedily, in order, into rows of ``seq_len + 1`` tokens; an example that does not fit
    starts the next row; the rest of a row is ``pad_id``. ``labels[t]`` is token ``t + 1``
    where that token is a target, else -100 (prompts, bos, padding). An example longer than
    ``seq_len + 1`` tokens is cut to that length and counted in ``stats["truncated"]``.
    Packed examples share a row: the loader emits no attention mask between them.

    Rank ``r`` receives global rows ``[r * B, (r + 1) * B)`` with ``B = global_batch //
    world_size``. ``stats`` holds global counts: examples consumed, batches, tokens (non-pad
    input positions), trained_tokens (labels != -100) and truncated. Token ids are the
    tokenizer's; checking them against the model's vocabulary is the caller's job.

    Raises ValueError naming the values for a bad mode, size, rank or world size, or when
    ``global_batch % world_size != 0``; ``next_batch`` raises ValueError for a plain-text
    document in SFT mode and TypeError for a document of another type.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "pretrain",
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if seq_len < 1 or global_batch < 1 or world_size < 1:
            raise ValueError(
                f"seq_len ({seq_len}), global_batch ({global_batch}) and world_size ({world_size}) must be >= 1"
            )
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.local_batch = global_batch // world_size
        self.mode = mode
        self._size = _source_size(source)
        self._get = source.example if hasattr(source, "example") else source.__getitem__
        self.cursor = 0  # index of the next example to take from the source
        self._carry_tokens: list[int] = []  # taken from the source, not yet placed in a row
        self._carry_trained: list[bool] = []
        self.stats = {"examples": 0, "batches": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0}

    # -- one example ------------------------------------------------------------------

    def _take(self) -> tuple[list[int], list[bool]]:
        """Tokens of the next example and, per token, whether it is a training target."""
        i = self.cursor if self._size is None else self.cursor % self._size
        doc = self._get(i)
        self.cursor += 1
        self.stats["examples"] += 1
        tok = self.tokenizer
        if isinstance(doc, str):
            if self.mode == "sft":
                raise ValueError(
                    f"document {i} of {self.source!r} is plain text; mode='sft' needs prompt/completion "
                    f"documents (e.g. JsonlCorpus with prompt_field= and completion_field=)"
                )
            tokens = [tok.bos_id, *tok.encode(doc), tok.eos_id]
            return tokens, [True] * len(tokens)
        if not (hasattr(doc, "prompt") and hasattr(doc, "completion")):
            raise TypeError(
                f"document {i} of {self.source!r} is a {type(doc).__name__}; expected str or prompt/completion"
            )
        prompt, completion = tok.encode(doc.prompt), tok.encode(doc.completion)
        tokens = [tok.bos_id, *prompt, *completion, tok.eos_id]
        trained = [self.mode == "pretrain"] * (1 + len(prompt)) + [True] * (len(completion) + 1)
        return tokens, trained

    # -- one global batch -------------------------------------------------------------

    def _pretrain_rows(self) -> tuple[list[list[int]], list[list[bool]]]:
        L, G = self.seq_len, self.global_batch
        need = G * L + 1
        while len(self._carry_tokens) < need:
            tokens, trained = self._take()
            self._carry_tokens += tokens
            self._carry_trained += trained
        rows = [self._carry_tokens[r * L : r * L + L + 1] for r in range(G)]
        trained = [self._carry_trained[r * L : r * L + L + 1] for r in range(G)]
        # the last token stays: it is the first input of the next batch
        del self._carry_tokens[: G * L], self._carry_trained[: G * L]
        return rows, trained

    def _sft_rows(self) -> tuple[list[list[int]], list[list[bool]]]:
        width = self.seq_len + 1
        rows, trained = [], []
        for _ in range(self.global_batch):
            row, row_trained = [], []
            while len(row) < width:
                if not self._carry_tokens:
                    tokens, flags = self._take()
                    if len(tokens) > width:
                        tokens, flags = tokens[:width], flags[:width]
                        self.stats["truncated"] += 1
                    self._carry_tokens, self._carry_trained = tokens, flags
                if len(row) + len(self._carry_tokens) > width:
                    break  # does not fit: it starts the next row
                row += self._carry_tokens
                row_trained += self._carry_trained
                self._carry_tokens, self._carry_trained = [], []
            self.stats["tokens"] += min(len(row), self.seq_len)  # non-pad input positions
            pad = width - len(row)
            rows.append(row + [self.tokenizer.pad_id] * pad)
            trained.append(row_trained + [False] * pad)
        return rows, trained

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank: ``input_ids`` and ``labels``, LongTensors of shape
        ``[global_batch // world_size, seq_len]``. Never ends: finite sources are cycled."""
        if self.mode == "pretrain":
            rows, trained = self._pretrain_rows()
            self.stats["tokens"] += self.global_batch * self.seq_len
        else:
            rows, trained = self._sft_rows()
        labels = [
            [t if ok else IGNORE for t, ok in zip(row[1:], flags[1:], strict=True)]
            for row, flags in zip(rows, trained, strict=True)
        ]
        self.stats["trained_tokens"] += sum(t != IGNORE for row in labels for t in row)
        self.stats["batches"] += 1
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        return {
            "input_ids": torch.tensor([row[:-1] for row in rows[lo:hi]], dtype=torch.long),
            "labels": torch.tensor(labels[lo:hi], dtype=torch.long),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # -- resumption -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position in the global stream, JSON-serialisable and the same on every rank:
        the example cursor, the carried-over tokens (taken, not yet served) and the stats."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "vocab_size": self.tokenizer.vocab_size,
            "cursor": self.cursor,
            "batches": self.stats["batches"],
            "carry_tokens": list(self._carry_tokens),
            "carry_trained": list(self._carry_trained),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``, possibly of another world size): with
        the same source, tokenizer, seq_len and global_batch the following batches equal
        those the saved loader would have produced.

        Raises ValueError naming the key for a missing or ill-typed entry, an unknown state
        version, or a mode or tokenizer vocabulary size different from this loader's.
        """
        expected = {
            "version": int,
            "mode": str,
            "vocab_size": int,
            "cursor": int,
            "carry_tokens": list,
            "carry_trained": list,
            "stats": dict,
        }
        for key, kind in expected.items():
            if key not in state:
                raise ValueError(f"loader state: missing key {key!r} (keys present: {sorted(state)})")
            if not isinstance(state[key], kind) or isinstance(state[key], bool):
                raise ValueError(f"loader state: {key!r} is {state[key]!r}; expected {kind.__name__}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"loader state: version {state['version']} is not {STATE_VERSION}")
        for key, mine in (("mode", self.mode), ("vocab_size", self.tokenizer.vocab_size)):
            if state[key] != mine:
                raise ValueError(f"loader state: {key!r} is {state[key]!r}, but this loader has {mine!r}")
        if len(state["carry_tokens"]) != len(state["carry_trained"]):
            raise ValueError(
                f"loader state: 'carry_tokens' has {len(state['carry_tokens'])} entries, "
                f"'carry_trained' {len(state['carry_trained'])}; expected equal lengths"
            )
        missing = set(self.stats) - set(state["stats"])
        if missing:
            raise ValueError(f"loader state: 'stats' lacks {sorted(missing)}")
        self.cursor = state["cursor"]
        self._carry_tokens = [int(t) for t in state["carry_tokens"]]
        self._carry_trained = [bool(t) for t in state["carry_trained"]]
        self.stats = {k: int(state["stats"][k]) for k in self.stats}

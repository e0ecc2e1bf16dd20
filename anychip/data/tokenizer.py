"""Tokenizers: a dependency-free byte-level one, and any Hugging Face ``tokenizer.json``.

Both expose the same small surface the loader and the model need: ``vocab_size``,
``pad_id``, ``bos_id``, ``eos_id``, ``encode`` (never adds special tokens), ``decode``
(drops special tokens) and ``name``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Names the common tokenizer families give their special tokens, tried in this order.
BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<｜begin▁of▁sentence｜>", "[BOS]")
EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "[EOS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>", "<|finetune_right_pad_id|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<pad>``=256, ``<bos>``=257, ``<eos>``=258."""

    name = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; no special tokens are added."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids, special ids skipped, invalid UTF-8 replaced by U+FFFD.

        Raises ValueError naming the id for an id outside 0..vocab_size-1.
        """
        data = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                data.append(i)
            elif not 256 <= i < self.vocab_size:
                raise ValueError(f"byte tokenizer: id {i} is outside 0..{self.vocab_size - 1}")
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    Special tokens are found by name: the explicit ``bos_token``/``eos_token``/``pad_token``
    when given, else the first of the common names (``BOS_NAMES``, ``EOS_NAMES``,
    ``PAD_NAMES``) present in the vocabulary. eos is required; a missing bos or pad
    falls back to eos (the GPT-2 convention: one ``<|endoftext|>`` for all three).

    Raises FileNotFoundError naming the path when the file is missing, and ValueError
    naming the file when it cannot be parsed, when an explicitly named token is not in
    its vocabulary, or when no eos token is found (listing the names tried).
    """

    def __init__(
        self,
        path: str | Path,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{self.path}: not a valid tokenizer.json ({e})") from e
        self.name = str(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find("eos", eos_token, EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"{self.path}: no end-of-sequence token found; tried {', '.join(EOS_NAMES)}; "
                f"name the one to use with eos_token="
            )
        bos = self._find("bos", bos_token, BOS_NAMES)
        pad = self._find("pad", pad_token, PAD_NAMES)
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = self.eos_id if pad is None else pad
        self._special = {self.bos_id, self.eos_id, self.pad_id}

    def _find(self, role: str, explicit: str | None, names: tuple[str, ...]) -> int | None:
        if explicit is not None:
            token_id = self._tok.token_to_id(explicit)
            if token_id is None:
                raise ValueError(f"{self.path}: {role}_token {explicit!r} is not in the vocabulary")
            return token_id
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; the tokenizer's post-processor specials are not added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with special tokens (bos, eos, pad and any marked special) skipped."""
        return self._tok.decode([int(i) for i in ids if int(i) not in self._special], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def load_tokenizer(spec: str | Path, **special_tokens: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` gives a ByteTokenizer; anything else is a ``tokenizer.json`` path or a
    directory holding one and gives an HFTokenizer (``special_tokens``: bos_token=,
    eos_token=, pad_token= overrides).

    Raises FileNotFoundError naming the path when neither the file nor a directory
    with a ``tokenizer.json`` exists, and HFTokenizer's ValueErrors for a bad file.
    """
    if str(spec) == "byte":
        if special_tokens:
            raise ValueError(f"the byte tokenizer has fixed special tokens; got {sorted(special_tokens)}")
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer not found: {path} (expected 'byte', a tokenizer.json or a directory with one)"
        )
    return HFTokenizer(path, **special_tokens)

"""Corpora on disk: JSON Lines records and plain-text files.

Both are finite, ordered and random-access: ``len()``, ``corpus[i]``, ``example(i)``
and iteration give the same documents in the same order every time. A document is a
plain ``str`` or, for prompt/completion records, an ``Example``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .tasks import Example


class JsonlCorpus:
    """One document per non-blank line of a ``.jsonl`` file.

    With ``prompt_field`` and ``completion_field`` set, each record becomes an Example
    (prompt, completion, answer ``""``, task ``"jsonl"``, entry the record); otherwise it
    becomes the string in ``text_field``. The whole file is checked when the corpus is
    built, so a bad record fails at start-up, not hours into a run; afterwards only byte
    offsets are kept in memory and records are re-read on access.

    Raises FileNotFoundError naming the path when the file is missing, and ValueError
    naming ``file:line`` for a line that is not a JSON object, a missing field (named),
    or a field that is not a string; ValueError naming the file when it holds no records.
    """

    def __init__(
        self,
        path: str | Path,
        text_field: str = "text",
        prompt_field: str | None = None,
        completion_field: str | None = None,
    ):
        self.path = Path(path)
        if (prompt_field is None) != (completion_field is None):
            raise ValueError(
                f"{self.path}: give both prompt_field and completion_field, or neither "
                f"(got prompt_field={prompt_field!r}, completion_field={completion_field!r})"
            )
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file not found: {self.path}")
        self.text_field = text_field
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        self._offsets: list[tuple[int, int]] = []  # (byte offset, line number)
        offset = 0
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    self._parse(raw, number)
                    self._offsets.append((offset, number))
                offset += len(raw)
        if not self._offsets:
            raise ValueError(f"{self.path}: no records (expected one JSON object per line)")

    @property
    def fields(self) -> tuple[str, ...]:
        if self.prompt_field is not None:
            return (self.prompt_field, self.completion_field)
        return (self.text_field,)

    def _parse(self, raw: bytes, number: int) -> str | Example:
        where = f"{self.path}:{number}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in self.fields:
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
            if not isinstance(record[name], str):
                raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
        if self.prompt_field is None:
            return record[self.text_field]
        return Example(record[self.prompt_field], record[self.completion_field], "", "jsonl", record)

    def __len__(self) -> int:
        return len(self._offsets)

    def example(self, i: int) -> str | Example:
        """Document ``i`` (0-based; negative counts from the end). Raises IndexError when
        out of range, and ValueError naming ``file:line`` if the file changed underneath."""
        offset, number = self._offsets[i]
        with self.path.open("rb") as f:
            f.seek(offset)
            return self._parse(f.readline(), number)

    __getitem__ = example

    def __iter__(self) -> Iterator[str | Example]:
        for i in range(len(self)):
            yield self.example(i)

    def __repr__(self) -> str:
        return f"JsonlCorpus({str(self.path)!r}, {len(self)} records)"


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class TextCorpus:
    """Plain-text documents separated by blank lines, from one ``.txt`` file or from every
    ``.txt`` file under a directory (recursively, in sorted path order). Documents are
    held in memory, stripped of surrounding blank lines.

    Raises FileNotFoundError naming the path when it does not exist, and ValueError
    naming the file for a file that is not UTF-8, or the path when no document is found.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*.txt") if p.is_file())
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"text corpus not found: {self.path}")
        self.documents: list[str] = []
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}: not UTF-8 text (byte {e.start})") from e
            text = text.replace("\r\n", "\n")
            self.documents.extend(d.strip("\n") for d in _BLANK_LINE.split(text) if d.strip())
        if not self.documents:
            raise ValueError(f"{self.path}: no documents (expected .txt text, documents separated by blank lines)")

    def __len__(self) -> int:
        return len(self.documents)

    def example(self, i: int) -> str:
        """Document ``i``; raises IndexError when out of range."""
        return self.documents[i]

    __getitem__ = example

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)

    def __repr__(self) -> str:
        return f"TextCorpus({str(self.path)!r}, {len(self)} documents)"

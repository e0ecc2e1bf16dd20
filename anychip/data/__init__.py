"""Data: tokenizers, reasoning-gym tasks, corpora on disk, and resumable sharded token batches."""

from .corpus import JsonlCorpus, TextCorpus
from .loader import TokenBatches
from .tasks import Example, ReasoningTasks, extract_answer, score
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "Example",
    "ReasoningTasks",
    "JsonlCorpus",
    "TextCorpus",
    "TokenBatches",
    "score",
    "extract_answer",
]

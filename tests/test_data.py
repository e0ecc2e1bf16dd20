"""anychip.data: tokenizers, reasoning-gym tasks, corpora and the packed, sharded, resumable loader."""

import json

import pytest
import torch

from anychip.data import (
    ByteTokenizer,
    Example,
    HFTokenizer,
    JsonlCorpus,
    ReasoningTasks,
    TextCorpus,
    TokenBatches,
    extract_answer,
    load_tokenizer,
    score,
)
from anychip.data.tasks import render

TASKS = ["basic_arithmetic", "chain_sum"]


@pytest.fixture(scope="module")
def train_tasks():
    return ReasoningTasks(TASKS, seed=3)


@pytest.fixture(scope="module")
def heldout_tasks():
    return ReasoningTasks(TASKS, seed=3, split="heldout")


# -- tokenizers -------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Calculate 3 × 4 = 12 — ünïcödé 漢字 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.name) == (259, 256, 257, 258, "byte")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials skipped
    assert tok.decode([0xE6, 0xBC]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    assert tok.decode(torch.tensor(tok.encode("ok"))) == "ok"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def _save_bpe(path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    sentences = ["the cat sat on the mat", "Calculate 12 + 7.", "<think>12 + 7 = 19</think>", "dogs and cats"] * 5
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer_loads_and_round_trips(tmp_path):
    raw = _save_bpe(tmp_path / "tokenizer.json", ["<pad>", "<bos>", "<eos>"])
    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == raw.get_vocab_size()
    text = "the cat sat on 12 + 7 = 19 — ünï"
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) < len(text.encode())  # merges were learnt and used
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    # explicit names win over the common ones
    assert HFTokenizer(tmp_path / "tokenizer.json", bos_token="<eos>").bos_id == 2


def test_hf_tokenizer_pad_falls_back_to_eos(tmp_path):
    _save_bpe(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id == tok.pad_id == tok.bos_id == 0


def test_hf_tokenizer_errors_name_file_and_tokens(tmp_path):
    path = tmp_path / "tokenizer.json"
    _save_bpe(path, ["<unk>"])
    with pytest.raises(ValueError, match="no end-of-sequence token") as e:
        HFTokenizer(path)
    assert str(path) in str(e.value) and "</s>" in str(e.value) and "<|endoftext|>" in str(e.value)
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        HFTokenizer(path, eos_token="<nope>")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


# -- tasks ------------------------------------------------------------------------------


def test_render_format_is_exact():
    entry = {"question": "  Calculate 12 + 7.\n", "answer": "19", "metadata": {"expression": "12 + 7"}}
    ex = render("basic_arithmetic", entry)
    assert ex.prompt == "Calculate 12 + 7.\n"
    assert ex.completion == "<think>12 + 7 = 19</think>\n<answer>19</answer>"
    assert (ex.answer, ex.task, ex.entry) == ("19", "basic_arithmetic", entry)
    no_expr = render("countdown", {"question": "Make 10 from 2, 5.", "answer": "2*5", "metadata": {}})
    assert no_expr.completion == "<think></think>\n<answer>2*5</answer>"


def test_column_reasoning_computes_the_answer_digit_by_digit():
    from anychip.data.tasks import column_steps

    entry = {"question": "Calculate 5 - 33.", "answer": "-28", "metadata": {"expression": "5 - 33"}}
    assert render("basic_arithmetic", entry, "columns").completion == (
        "<think>-(33-5) 3-5-0=-2 3-0-1=2 |-28</think>\n<answer>-28</answer>"
    )
    assert column_steps(99, "+", 99) == "9+9+0=18 9+9+1=19 |198"
    assert column_steps(100, "-", 1) == "0-1-0=-1 0-0-1=-1 1-0-1=0 |99"
    g = __import__("random").Random(0)
    for _ in range(500):  # every step follows from the one before; the result is the arithmetic's
        a, b, op = g.randrange(1000), g.randrange(1000), g.choice("+-")
        text = column_steps(a, op, b)
        steps, result = text.rsplit(" |", 1)
        assert int(result) == (a + b if op == "+" else a - b)
        carry = 0
        for step in steps.split(" "):
            if step.startswith("-("):
                continue
            lhs, v = step.split("=")
            x, y, c = (int(t) for t in lhs.split(op))
            assert c == carry
            v = int(v)
            assert v == (x + y + c if op == "+" else x - y - c)
            carry = v // 10 if op == "+" else int(v < 0)
    # anything else keeps the expression: more terms, or an answer the columns would not give
    three = {"question": "q", "answer": "6", "metadata": {"expression": "1 + 2 + 3"}}
    assert render("chain_sum", three, "columns").completion == "<think>1 + 2 + 3 = 6</think>\n<answer>6</answer>"
    with pytest.raises(ValueError, match="reasoning"):
        render("chain_sum", three, "essay")


def test_tasks_render_reasoning_gym_entries(train_tasks):
    for i in range(6):
        ex = train_tasks.example(i)
        assert ex.task == TASKS[i % 2]
        q, a = ex.entry["question"], ex.entry["answer"]
        assert ex.prompt == q.strip() + "\n" and ex.answer == a
        assert ex.completion == f"<think>{ex.entry['metadata']['expression']} = {a}</think>\n<answer>{a}</answer>"
        assert ex.entry["metadata"]["num_digits"] <= 2  # the easy defaults are in force
    assert train_tasks.example(0).entry["metadata"]["num_terms"] == 2
    with pytest.raises(ValueError, match="valid names: .*basic_arithmetic"):
        ReasoningTasks(["no_such_task"])


def test_heldout_never_in_train(train_tasks, heldout_tasks):
    import reasoning_gym

    assert len(heldout_tasks) == 200
    with pytest.raises(IndexError):
        heldout_tasks.example(200)
    held = {(heldout_tasks.example(i).task, heldout_tasks.example(i).prompt) for i in range(200)}
    assert len({p for _, p in held}) > 100
    train = [(ex.task, ex.prompt) for ex in map(train_tasks.example, range(4000))]
    assert not held & set(train)
    # the check has teeth: these tasks repeat questions, so unfiltered sampling would collide
    raw = reasoning_gym.create_dataset("chain_sum", seed=12345, size=2000, min_terms=2, max_terms=3, max_digits=2)
    assert sum(("chain_sum", e["question"].strip() + "\n") in held for e in raw) > 0


def test_tasks_are_deterministic(train_tasks):
    again = ReasoningTasks(TASKS, seed=3)
    for i in (5, 0, 977, 3, 12_345):  # any order of access
        assert again.example(i) == train_tasks.example(i)
    other = ReasoningTasks(TASKS, seed=4)
    assert [other.example(i).prompt for i in range(20)] != [train_tasks.example(i).prompt for i in range(20)]
    assert ReasoningTasks(TASKS, seed=3, split="heldout").example(7) != train_tasks.example(7)


def test_score_and_extract_answer(train_tasks):
    for i in range(4):
        ex = train_tasks.example(i)
        assert score(ex, ex.completion) == 1.0
        assert train_tasks.score(ex, f"<think>hm</think>\n<answer> {ex.answer} </answer> trailing") == 1.0
        wrong = str(int(ex.answer) + 1)
        assert score(ex, f"<answer>{wrong}</answer>") == 0.0
        assert score(ex, ex.answer) == 0.0  # no tags
        assert score(ex, f"<answer>{ex.answer}") == 0.0  # no closing tag
    assert extract_answer("x <answer>1</answer> <answer>2</answer>") == "1"
    assert extract_answer("</answer><answer>3</answer>") == "3"
    assert extract_answer("nothing") is None


# -- loader -----------------------------------------------------------------------------


def _stream(docs, tok, n):
    out = []
    i = 0
    while len(out) < n:
        out += [tok.bos_id, *tok.encode(docs[i % len(docs)]), tok.eos_id]
        i += 1
    return out[:n]


def test_pretrain_packs_one_stream_shifted_by_one():
    tok = ByteTokenizer()
    docs = ["alpha beta", "γ", "a much longer document that spans more than one window of tokens", "z"]
    L, G, steps = 16, 3, 5
    loader = TokenBatches(docs, tok, seq_len=L, global_batch=G)
    stream = _stream(docs, tok, steps * G * L + 1)
    inputs, labels = [], []
    for _ in range(steps):
        b = loader.next_batch()
        assert b["input_ids"].shape == b["labels"].shape == (G, L)
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long
        inputs += b["input_ids"].flatten().tolist()
        labels += b["labels"].flatten().tolist()
    assert inputs == stream[:-1]
    assert labels == stream[1:]
    assert loader.stats["tokens"] == loader.stats["trained_tokens"] == steps * G * L


def _sft_expected(examples, tok, L, rows):
    """Reference packing, written out plainly: whole examples in order, a row is closed when
    the next one does not fit; targets are completion tokens and eos."""
    width, out, k, pending = L + 1, [], 0, None
    for _ in range(rows):
        toks, target = [], []
        while True:
            if pending is None:
                ex = examples[k]
                k += 1
                p, c = tok.encode(ex.prompt), tok.encode(ex.completion)
                pending = ([tok.bos_id, *p, *c, tok.eos_id], [False] * (1 + len(p)) + [True] * (len(c) + 1))
                pending = (pending[0][:width], pending[1][:width])
            if len(toks) + len(pending[0]) > width:
                break
            toks += pending[0]
            target += pending[1]
            pending = None
            if len(toks) == width:
                break
        n = len(toks)
        toks += [tok.pad_id] * (width - n)
        target += [False] * (width - n)
        out.append((toks[:-1], [t if ok else -100 for t, ok in zip(toks[1:], target[1:], strict=True)], n))
    return out


def test_sft_labels_only_on_completions(train_tasks):
    tok = ByteTokenizer()
    L, G, steps = 160, 4, 3
    loader = TokenBatches(train_tasks, tok, seq_len=L, global_batch=G, mode="sft")
    examples = [train_tasks.example(i) for i in range(200)]
    expected = _sft_expected(examples, tok, L, G * steps)
    got = []
    for _ in range(steps):
        b = loader.next_batch()
        got += list(zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True))
    for (inp, lab), (exp_inp, exp_lab, n) in zip(got, expected, strict=True):
        assert inp == exp_inp and lab == exp_lab
        assert all(t == tok.pad_id for t in inp[n:]) and all(t == -100 for t in lab[n - 1 :])
    # in order, the targets are exactly the completions (each followed by eos) of the examples placed
    placed = loader.stats["examples"] - (1 if loader.state_dict()["carry_tokens"] else 0)
    targets = [t for _, lab in got for t in lab if t != -100]
    assert targets.count(tok.eos_id) == placed and tok.bos_id not in targets
    text = bytes(t for t in targets if t < 256).decode()
    assert text == "".join(ex.completion for ex in examples[:placed])
    assert loader.stats["truncated"] == 0


def test_sft_truncates_long_examples(train_tasks):
    tok = ByteTokenizer()
    loader = TokenBatches(train_tasks, tok, seq_len=40, global_batch=2, mode="sft")
    b = loader.next_batch()
    assert loader.stats["truncated"] == loader.stats["examples"] == 2  # every example is longer than 41 tokens
    assert (b["input_ids"] != tok.pad_id).all()
    expected = _sft_expected([train_tasks.example(i) for i in range(2)], tok, 40, 2)
    assert b["labels"].tolist() == [lab for _, lab, _ in expected]


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_resume_gives_identical_batches(train_tasks, mode):
    tok = ByteTokenizer()
    original = TokenBatches(train_tasks, tok, seq_len=150, global_batch=4, mode=mode)
    for _ in range(2):
        original.next_batch()
    for _ in range(20):  # stop at a state with tokens carried over, so resumption must restore them
        if original.state_dict()["carry_tokens"]:
            break
        original.next_batch()
    assert original.state_dict()["carry_tokens"]
    k = original.stats["batches"]
    state = json.loads(json.dumps(original.state_dict()))
    restored = TokenBatches(ReasoningTasks(TASKS, seed=3), tok, seq_len=150, global_batch=4, mode=mode)
    restored.load_state_dict(state)
    for _ in range(3):
        a, b = original.next_batch(), restored.next_batch()
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert restored.stats == original.stats and restored.stats["batches"] == k + 3
    with pytest.raises(ValueError, match="'mode'"):
        TokenBatches(train_tasks, tok, 150, 4, mode="sft" if mode == "pretrain" else "pretrain").load_state_dict(state)
    with pytest.raises(ValueError, match="missing key 'cursor'"):
        restored.load_state_dict({k: v for k, v in state.items() if k != "cursor"})


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_ranks_partition_the_global_batch(train_tasks, mode):
    tok = ByteTokenizer()
    whole = TokenBatches(train_tasks, tok, seq_len=48, global_batch=4, mode=mode)
    ranks = [
        TokenBatches(train_tasks, tok, seq_len=48, global_batch=4, rank=r, world_size=2, mode=mode) for r in (0, 1)
    ]
    for _ in range(4):
        w = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0]["input_ids"].shape == (2, 48)
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), w[key])
    # the state is global: a 1-process checkpoint resumes on rank 1 of 2
    moved = TokenBatches(train_tasks, tok, seq_len=48, global_batch=4, rank=1, world_size=2, mode=mode)
    moved.load_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert torch.equal(moved.next_batch()["labels"], whole.next_batch()["labels"][2:])


def test_loader_rejects_bad_sharding_and_sources(train_tasks):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="global_batch 6 is not divisible by world_size 4"):
        TokenBatches(train_tasks, tok, seq_len=8, global_batch=6, world_size=4)
    with pytest.raises(ValueError, match="plain text"):
        TokenBatches(["just text"], tok, seq_len=8, global_batch=1, mode="sft").next_batch()


# -- corpora ----------------------------------------------------------------------------


def test_jsonl_corpus_documents_and_sft(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"q": f"What is {i} + 1?\n", "a": f"<answer>{i + 1}</answer>", "text": f"doc {i}"} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    text = JsonlCorpus(path)
    assert len(text) == 5 and list(text) == [f"doc {i}" for i in range(5)] and text[3] == "doc 3"
    pairs = JsonlCorpus(path, prompt_field="q", completion_field="a")
    assert isinstance(pairs.example(4), Example) and pairs.example(4).completion == "<answer>5</answer>"
    b = TokenBatches(pairs, ByteTokenizer(), seq_len=80, global_batch=2, mode="sft").next_batch()
    targets = bytes(t for t in b["labels"][0].tolist() if 0 <= t < 256).decode()
    assert targets == "<answer>1</answer><answer>2</answer>"  # prompts carry no loss


def test_jsonl_corpus_errors_name_file_line_and_field(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        JsonlCorpus(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{bad}:3: invalid JSON"):
        JsonlCorpus(bad)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=rf"{lacking}:2: missing field 'text'"):
        JsonlCorpus(lacking)
    with pytest.raises(ValueError, match=rf"{lacking}:1: missing field 'q'"):
        JsonlCorpus(lacking, prompt_field="q", completion_field="text")
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=rf"{numeric}:1: field 'text' must be a string"):
        JsonlCorpus(numeric)


def test_text_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n  \n\nsecond doc\n")
    (tmp_path / "skip.md").write_text("not text corpus\n")
    corpus = TextCorpus(tmp_path)
    assert list(corpus) == ["first doc\nline two", "second doc", "second file"]
    assert TextCorpus(tmp_path / "b.txt")[0] == "second file"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone")):
        TextCorpus(tmp_path / "gone")

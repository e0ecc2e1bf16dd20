"""Batched sampling with the KV cache."""

import torch
from conftest import make_args, make_model

from anychip.generate import generate


def test_batched_left_padded_generation_equals_one_by_one():
    args = make_args()
    model = make_model(args).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 5)]
    together = generate(model, prompts, max_new_tokens=10, eos_id=1, pad_id=0)
    alone = [generate(model, [p], max_new_tokens=10, eos_id=1, pad_id=0)[0] for p in prompts]
    assert together == alone
    # greedy decoding continues exactly as the argmax of full forwards
    seq = prompts[1]
    for token in alone[1]:
        with torch.no_grad():
            assert model(torch.tensor([seq]))[0, -1].argmax().item() == token
        seq = seq + [token]


def test_sequences_that_finish_early_leave_the_batch_unchanged_for_the_rest():
    """Rows that stop early (eos or stop string) are dropped from the batch and the cache;
    the others continue exactly as they would alone, greedy and sampled alike."""
    args = make_args()
    model = make_model(args, seed=3).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=gen).tolist() for n in (4, 7, 5, 6, 3, 8, 5, 4)]
    free = [generate(model, [p], max_new_tokens=12, eos_id=-1, pad_id=0)[0] for p in prompts]
    # an eos that ends row 0 early while some other row never produces it
    eos = next(t for t in free[0] if any(t not in f for f in free[1:]))
    stop = [free[1][3:5]]
    alone = [generate(model, [p], max_new_tokens=12, eos_id=eos, pad_id=0, stop=stop)[0] for p in prompts]
    together = generate(model, prompts, max_new_tokens=12, eos_id=eos, pad_id=0, stop=stop)
    assert together == alone
    lengths = [len(x) for x in together]
    assert lengths[0] < 12 and lengths[1] <= 5 and max(lengths) == 12  # some finished early, some ran on
    for x, f in zip(together, free):
        assert x == f[: len(x)]
    banned = generate(model, prompts, 12, -1, 0, temperature=1.0, generator=gen, vocab_size=20, suppress=(3, 4))
    assert all(t < 20 and t not in (3, 4) for x in banned for t in x)


def test_stop_sequence_and_eos_end_a_sequence():
    args = make_args()
    model = make_model(args).eval()
    prompt = [5, 6, 7]
    free = generate(model, [prompt], max_new_tokens=8, eos_id=-1, pad_id=0)[0]
    stopped = generate(model, [prompt], max_new_tokens=8, eos_id=-1, pad_id=0, stop=[free[2:4]])[0]
    assert stopped == free[:4]
    eos = generate(model, [prompt], max_new_tokens=8, eos_id=free[1], pad_id=0)[0]
    assert eos == free[:2]


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    args = make_args()
    model = make_model(args).eval()
    prompts = [[5, 6, 7], [9, 10]]
    a = generate(model, prompts, 12, -1, 0, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, 12, -1, 0, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b
    greedy = generate(model, prompts, 12, -1, 0)
    assert generate(model, prompts, 12, -1, 0, temperature=0.7, top_k=1) == greedy
    assert generate(model, prompts, 12, -1, 0, temperature=0.7, top_p=1e-6) == greedy

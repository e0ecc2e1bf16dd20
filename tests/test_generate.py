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

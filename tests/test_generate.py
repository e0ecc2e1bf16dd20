"""Batched sampling with the KV cache, on one process and on a sharded model in lockstep."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_args, make_model

from anychip.generate import generate
from anychip.parallel import World


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


def test_sampled_tokens_come_with_their_log_probs_under_the_whole_output_layer():
    """The log-prob of each sampled token is the full forward's log-softmax at the sampling
    temperature, over every output id (before the excluded ids and top-k are cut away)."""
    args = make_args()
    model = make_model(args, seed=1).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    outs, logps = generate(
        model,
        prompts,
        8,
        -1,
        0,
        temperature=0.8,
        top_k=20,
        generator=torch.Generator().manual_seed(3),
        vocab_size=90,
        suppress=(0,),
        logprobs=True,
    )
    for prompt, out, logp in zip(prompts, outs, logps):
        assert len(logp) == len(out) == 8
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prompt + out]))[0].float() / 0.8, dim=-1)
        want = [full[len(prompt) - 1 + j, t].item() for j, t in enumerate(out)]
        assert logp == pytest.approx(want, abs=1e-5)
    assert generate(model, [], 4, -1, 0) == [] and generate(model, [], 4, -1, 0, logprobs=True) == ([], [])
    # lockstep over one process is no lockstep: the same tokens
    assert generate(model, prompts, 8, -1, 0, lockstep=World()) == generate(model, prompts, 8, -1, 0)


def _on_two_ranks(rank: int, init_file: str, checks) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        checks(rank)
    finally:
        dist.destroy_process_group()


def _lockstep_checks(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    args = make_args()
    plain = make_model(args, seed=3).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=gen).tolist() for n in (4, 7, 5, 6, 3, 8)]
    free = generate(plain, prompts, 12, -1, 0)
    eos = free[0][5]  # ends rank 0's rows halfway, while rank 1's run on
    mine = prompts[:2] if rank == 0 else prompts[2:]  # rank 0: 2 rows, rank 1: 4
    calls = [
        (mine, dict(eos_id=eos)),
        (mine, dict(eos_id=eos, temperature=1.0, top_p=0.9)),
        ([] if rank == 0 else mine, dict(eos_id=-1)),  # rank 0 has nothing to do, and still steps
    ]

    def run(model, lockstep=None):
        return [
            generate(
                model,
                p,
                12,
                pad_id=0,
                generator=torch.Generator().manual_seed(7 + rank),
                lockstep=lockstep,
                logprobs=True,
                **kw,
            )
            for p, kw in calls
        ]

    alone = run(plain)
    model = make_model(args, seed=3).eval()
    mesh = init_device_mesh("cpu", (2,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    together = run(model, World(rank, 2, mesh=mesh))
    assert together == alone
    lengths = [len(o) for o in alone[0][0]]
    assert max(lengths) < 12 if rank == 0 else max(lengths) == 12, lengths
    # mixed precision: the shards stay float32, the blocks compute (and the cache holds) bfloat16
    low = make_model(args, seed=3).eval()
    for module in [*low.layers, low]:
        fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    whole = make_model(args, seed=3).eval().to(torch.bfloat16)
    assert generate(low, mine, 12, eos, 0, lockstep=World(rank, 2, mesh=mesh)) == generate(whole, mine, 12, eos, 0)


def test_a_sharded_model_decodes_in_lockstep_what_one_process_decodes(tmp_path):
    """Two ranks sample from one FSDP2-sharded model (every forward a collective): rows finish at
    different steps on each rank, and a rank with no prompts at all still joins every forward;
    each rank's tokens and log-probs equal those of the whole model on one process."""
    mp.start_processes(_on_two_ranks, args=(str(tmp_path / "init"), _lockstep_checks), nprocs=2, start_method="spawn")


def _evaluate_checks(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from anychip.data import ByteTokenizer, ReasoningTasks
    from anychip.eval import evaluate, shard

    args = make_args(vocab_size=264)  # the byte tokenizer's 259 ids, and some it never emits
    tok = ByteTokenizer()
    tasks = ReasoningTasks(["basic_arithmetic"], seed=0, split="heldout", heldout_size=8)
    mine = shard([tasks.example(i) for i in range(3)], rank, 2)  # rank 0: 2 problems, rank 1: 1
    alone = evaluate(make_model(args, seed=4), tok, mine, 16, batch_size=1)
    model = make_model(args, seed=4)
    mesh = init_device_mesh("cpu", (2,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    together = evaluate(model, tok, mine, 16, batch_size=1, lockstep=World(rank, 2, mesh=mesh))
    assert together.samples == alone.samples and together.n == alone.n == len(mine)
    assert (together.correct, together.exact) == (alone.correct, alone.exact)


def test_a_sharded_model_is_evaluated_in_lockstep_as_one_process_evaluates_it(tmp_path):
    """Held-out evaluation of an FSDP2-sharded model, each rank its share (2 and 1 problems, one
    per batch): the rank with fewer batches steps along with the other, and each scores what
    the whole model scores on one process."""
    mp.start_processes(_on_two_ranks, args=(str(tmp_path / "init"), _evaluate_checks), nprocs=2, start_method="spawn")

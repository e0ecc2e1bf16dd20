"""One pool's side of a run over several pools: torchft's Manager between this job and the others.

    join       before a step: the quorum of the live pools (the lighthouse's); a pool behind
               the others (one that comes back) takes a live pool's state, not the disk's
    sum        (sync = "step") the normalisers of the step (e.g. its target tokens) and its
               loss sums, summed over the pools: each pool's loss is its share of the global
               batch's, as a data-parallel rank's is
    exchange   after the backward pass (sync = "step"): gradients and expert loads summed over
               the pools, on CPU tensors with gloo (every vendor reaches it); False when a pool
               failed during the exchange: the step is done again by the pools that are left
    DiLoCo     (sync = "diloco"): torchft's DiLoCo on the optimizer, every sync_every steps
               the pools average their weight changes and take an outer (Nesterov) step

Rank r of a pool exchanges with rank r of every other pool: the pools of a run have the same
number of processes and layout. The data is one global stream (anychip.data.TokenBatches):
pool i's rank r reads the rows of data rank i x world size + r, so two pools of one process
and per-step averaging make the same steps as one job of the same global batch.

Events (this pool's events.jsonl, rank 0): ``quorum_changed`` (the pools in it, lost, joined),
``pool_lost`` for each pool gone, ``pool_state_sent`` / ``pool_recovered`` (with the weights'
fingerprint on both sides) when a pool takes the state of another, ``pool_step_discarded``.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import torch

from ..errors import ConfigError
from ..events import append_event
from ..guards.sdc import fingerprint
from ..launcher_env import POOL
from ..parallel import World, unwrap
from ..snapshot import load_state_tensors, state_tensors

STATE_KEY = "anychip"  # this job's state in torchft's state dict (beside torchft's own)


def pool_index(cfg) -> int | None:
    """This job's pool in a run of ``pools.count`` pools ($ANYCHIP_POOL); None without pools.
    Raises ConfigError when the run has pools and the index is missing or out of range."""
    count = cfg.pools.count
    if count == 1:
        return None
    raw = os.environ.get(POOL)
    if raw is None or not raw.isdigit() or int(raw) >= count:
        raise ConfigError(
            f"pools.count = {count}: this job must be told which pool it is (0..{count - 1}): start the pools with "
            f"`anychip train --pools {count}`, or each with `anychip train --pool I --lighthouse URL` (${POOL} = {raw!r})"
        )
    return int(raw)


def data_shard(world: World, index: int | None, count: int) -> tuple[int, int]:
    """(data rank, data world size) of this rank: its rows of the run's global batch."""
    if index is None:
        return world.rank, world.world_size
    return index * world.world_size + world.rank, count * world.world_size


class NoPools:
    """A run of one pool: nothing to join, average or exchange."""

    active = False

    def join(self, state) -> None:
        pass

    def sum(self, values: dict) -> dict:
        return values

    def exchange(self, state) -> bool:
        return True

    def took_state(self) -> bool:
        return False

    def metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class PoolSync(NoPools):
    """This pool's Manager (one per rank; the pool's ranks share its replica group)."""

    active = True

    def __init__(self, cfg, state, index: int, heartbeat=None, first_start: bool = True):
        try:
            from torchft import Manager, ProcessGroupGloo
        except ImportError as e:  # an optional dependency: anychip[pools]
            raise ConfigError(
                f"pools.count = {cfg.pools.count} needs torchft: pip install 'anychip[pools]' ({e})"
            ) from None
        _quiet_torchft()
        p = cfg.pools
        self.cfg, self.state, self.heartbeat = p, state, heartbeat
        self.name = f"pool{index}"
        self.world = state.world
        self.participants = 0
        self.members: list[str] | None = None  # the pools of the last quorum
        self.bytes_sent = 0  # to the other pools, since the last metrics record
        self._took = False
        self._names = None
        self.first_start = first_start  # the run's first start of this pool: it waits for the others
        store_addr, store_port = _pool_store(self.world)
        if store_addr is None:  # one process and no agent: the replica group's store is ours
            from torch.distributed import TCPStore

            self._store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = "127.0.0.1", self._store.port
        else:
            _forget_manager(self.world, store_addr, store_port)
        timeout = timedelta(seconds=2 * p.timeout_s)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout),
            load_state_dict=self._load,
            state_dict=self._state_dict,
            min_replica_size=1,
            use_async_quorum=False,  # a pool that comes back takes the state before its step, not during it
            init_sync=p.sync == "step",  # DiLoCo: a first exchange of weights would drop one pool's first H steps
            timeout=timeout,
            quorum_timeout=timedelta(seconds=max(120.0, 20 * p.timeout_s)),
            connect_timeout=timedelta(seconds=30),
            rank=self.world.rank,
            world_size=self.world.world_size,
            store_addr=store_addr,
            store_port=store_port,
            replica_id=self.name,  # torchft appends a uuid: a restarted pool is a new member
        )
        self._tap = _QuorumTap(self.manager)
        self.manager.load_state_dict({"step": self._manager_step(state.step), "batches_committed": 0})
        self.diloco = None
        if p.sync == "diloco":
            from torchft.local_sgd import DiLoCo

            params = [q for q in state.model.parameters() if q.requires_grad]
            self.outer = torch.optim.SGD(
                params, lr=p.outer_lr, momentum=p.outer_momentum, nesterov=p.outer_momentum > 0
            )
            self.diloco = DiLoCo(self.manager, [state.model], state.optimizer, self.outer, sync_every=p.sync_every)
            self._count_bytes()
            self.diloco.__enter__()
            self._before_sync = state.optimizer.register_step_pre_hook(self._syncing)
            self._after_sync = state.optimizer.register_step_post_hook(self._synced)
            self._synced_step = self.manager.current_step()

    # -- the loop's calls ------------------------------------------------------------

    def join(self, state) -> None:
        """Per-step sync: the quorum of this step; a pool behind the others takes a live pool's
        state here. At a run's first step every pool waits for the others (up to 20 x the timeout)."""
        if self.diloco is not None:
            return
        self.manager.load_state_dict({"step": state.step, "batches_committed": self.manager.batches_committed()})
        deadline = time.monotonic() + 20 * self.cfg.timeout_s
        while True:
            self._beat(state, "quorum")
            self.manager.start_quorum()
            self._took = False  # taken before this step: the step is this pool's like any other
            self._record_quorum(state)
            fresh_run = self.first_start and state.step == 0 and self._tap.last.max_step == 0
            if not fresh_run or self.participants >= self.cfg.count or time.monotonic() > deadline:
                self.first_start = False
                return
            time.sleep(0.2)

    def sum(self, values: dict) -> dict:
        """Per-step sync: each named number summed over the pools of the quorum (float64)."""
        if self.diloco is not None:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        self._allreduce(t)
        return dict(zip(values, t.tolist()))

    def exchange(self, state) -> bool:
        """Per-step sync: sum the gradients (each pool's is its share of the global batch's) and
        the expert loads over the pools of the quorum. False (the step's gradients dropped, the
        same batch again next step) when a pool failed during the step's exchanges."""
        if self.diloco is not None:
            return True
        self._beat(state, "exchange")
        core = unwrap(state.model)
        params = [q for q in state.model.parameters() if q.requires_grad]
        for q in params:  # the same tensors in every pool, whatever this pool's batch reached
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        locals_ = [q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad for q in params]
        loads = core.expert_loads().detach().float()
        flat = torch.cat([*(g.detach().reshape(-1).float().cpu() for g in locals_), loads.reshape(-1).cpu()])
        self._allreduce(flat)
        if not self.manager.should_commit():
            state.optimizer.zero_grad(set_to_none=True)
            core.clear_expert_loads()
            if self.world.is_main:
                err = self.manager.errored()
                append_event(
                    state.run_dir,
                    "pool_step_discarded",
                    step=state.step,
                    pools=_names(self.members or []),
                    error=str(err.original_exception) if err is not None else None,
                )
            state.step -= 1  # the same batch again, with the pools that are left
            return False
        offset = 0
        with torch.no_grad():
            for g in locals_:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
            # rank r's loads summed over the pools; the loop sums them over this pool's ranks
            for layer, row in zip(core.moe_layers(), flat[offset:].view_as(loads)):
                layer.expert_load.copy_(row.to(layer.expert_load))
        return True

    def _allreduce(self, t: torch.Tensor) -> None:
        from torch.distributed import ReduceOp

        self.bytes_sent += t.numel() * t.element_size()
        self.manager.allreduce(t, reduce_op=ReduceOp.SUM).wait()

    def took_state(self) -> bool:
        """DiLoCo: whether the optimizer step just took a live pool's state (this pool came back);
        the step's own outcome is then replaced by it."""
        took, self._took = self._took, False
        return took

    def metrics(self) -> dict:
        sent, self.bytes_sent = self.bytes_sent, 0
        return {"pools": self.participants, "pool_bytes": sent}

    def close(self) -> None:
        if self.diloco is not None:
            self._before_sync.remove()
            self._after_sync.remove()
            self.diloco.__exit__(None, None, None)
        with contextlib.suppress(Exception):
            self.manager.shutdown(wait=False)

    # -- the state a returning pool takes --------------------------------------------

    def _state_dict(self) -> dict:
        """What a pool behind takes from this one (called in torchft's quorum thread, while the
        loop waits for the quorum)."""
        s = self.state
        if self._names is None:
            self._names = {q: n for n, q in s.model.named_parameters()}
        tensors = {k: v.detach().cpu().clone() for k, v in state_tensors(s, self._names).items()}
        if self.world.is_main:
            append_event(
                s.run_dir,
                "pool_state_sent",
                step=s.step,
                pool=self.name,
                weights=fingerprint(list(s.model.parameters())),
            )
        return {"step": s.step, "data": s.data.state_dict(), "tensors": tensors}

    def _load(self, sent: dict) -> None:
        s = self.state
        before = s.step
        load_state_tensors(s, sent["tensors"], "the state of a live pool")
        s.data.load_state_dict(sent["data"])
        s.step = sent["step"]
        s.batch = None
        unwrap(s.model).clear_expert_loads()
        s.optimizer.zero_grad(set_to_none=True)
        self._took = True
        if self.world.is_main:
            append_event(
                s.run_dir,
                "pool_recovered" if s.step or before else "pool_synced_at_start",
                pool=self.name,
                step=s.step,
                from_step=before,
                source=self._tap.source(),
                weights=fingerprint(list(s.model.parameters())),
            )

    # -- bookkeeping -----------------------------------------------------------------

    def _manager_step(self, step: int) -> int:
        """torchft's step: this run's step (per-step sync) or the exchanges so far (DiLoCo)."""
        return step // self.cfg.sync_every if self.cfg.sync == "diloco" else step

    def _record_quorum(self, state) -> None:
        self.participants = self.manager.num_participants()
        members = sorted(self._tap.members())  # pool:uuid: a pool started again is a new member
        if members == self.members:
            return
        before, self.members = self.members or [], members
        if not self.world.is_main:
            return
        lost = [m for m in before if m not in members]
        joined = [m for m in members if m not in before]
        append_event(
            state.run_dir,
            "quorum_changed",
            step=state.step,
            pools=_names(members),
            lost=_names(lost),
            joined=_names(joined),
            quorum_id=self._tap.last.quorum_id,
        )
        for member in lost:
            append_event(state.run_dir, "pool_lost", pool=_names([member])[0], step=state.step, seen_by=self.name)

    def _beat(self, state, phase: str) -> None:
        """A quorum waits up to the timeout for a lost pool: not a hang of this one."""
        if self.heartbeat is not None:
            self.heartbeat.beat(state.step, phase, self.cfg.timeout_s * 6 + self.heartbeat.cfg.watchdog_grace_s)

    def _count_bytes(self) -> None:
        """DiLoCo: count what its exchanges send (the manager's all-reduces)."""
        allreduce = self.manager.allreduce

        def counted(tensor, *args, **kwargs):
            self.bytes_sent += tensor.numel() * tensor.element_size()
            return allreduce(tensor, *args, **kwargs)

        self.manager.allreduce = counted

    def _syncing(self, optimizer, args, kwargs) -> None:
        """DiLoCo: before a step that ends with the exchange, the watchdog is told to wait for the
        slowest pool's H steps (pools go at their own speed between exchanges)."""
        if self.heartbeat is not None and self.diloco._local_step + 1 >= self.diloco._sync_every:
            wait = self.manager._quorum_timeout.total_seconds() + self.heartbeat.cfg.watchdog_grace_s
            self.heartbeat.beat(self.state.step, "exchange", wait)

    def _synced(self, optimizer, args, kwargs) -> None:
        """After DiLoCo's exchange (its hook runs first): the quorum's record, and the balancing
        biases (buffers, which DiLoCo does not average) averaged too."""
        if self.manager.current_step() == self._synced_step and not self._took:
            return
        self._synced_step = self.manager.current_step()
        self._record_quorum(self.state)
        core = unwrap(self.state.model)
        biases = [m.gate.e_score_correction_bias for m in core.moe_layers()]
        if biases:  # every pool of the quorum, also one that just took the state: the same collectives
            flat = torch.cat([b.detach().float().cpu() for b in biases])
            self.manager.allreduce(flat).wait()
            if self.manager.errored() is None:
                with torch.no_grad():
                    for b, part in zip(biases, flat.split([b.numel() for b in biases])):
                        b.copy_(part.view_as(b))


class _QuorumTap:
    """Keeps the last quorum torchft's Manager received (the pools in it, who heals from whom):
    the Manager uses it without keeping it. Wraps the Manager's client (torchft 0.2.0)."""

    def __init__(self, manager):
        self._client = manager._client
        self.last = None
        manager._client = self

    def _quorum(self, *args, **kwargs):
        self.last = self._client._quorum(*args, **kwargs)
        return self.last

    def __getattr__(self, name):
        return getattr(self._client, name)

    def members(self) -> list[str]:
        return list(self.last.replica_ids) if self.last is not None else []

    def source(self) -> str | None:
        q = self.last
        if q is None or q.recover_src_replica_rank is None:
            return None
        ids = q.replica_ids
        return ids[q.recover_src_replica_rank].split(":")[0] if q.recover_src_replica_rank < len(ids) else None


def _names(members: list[str]) -> list[str]:
    return [m.split(":")[0] for m in members]


def _quiet_torchft() -> None:
    """torchft logs every quorum (its Rust servers, at info), a traceback for every exchange a
    lost pool broke, and each state transfer (its HTTP server): the events say what happened."""
    import http.server
    import logging

    os.environ.setdefault("RUST_LOG", "warn")
    if os.environ.get("ANYCHIP_TORCHFT_LOG") is None:  # set it to see torchft's own log
        logging.getLogger("torchft").setLevel(logging.CRITICAL)
        http.server.BaseHTTPRequestHandler.log_message = lambda *args: None
    import warnings

    warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _forget_manager(world: World, addr: str, port: int) -> None:
    """The Manager's rank 0 publishes its address in the pool's store under fixed keys: remove
    those of an earlier start of this pool (a restart in place), before any rank reads them."""
    if not world.distributed:
        return  # rank 0 writes them before it reads them
    import torch.distributed as dist
    from torch.distributed import TCPStore
    from torchft.manager import MANAGER_ADDR_KEY, REPLICA_ID_KEY

    dist.barrier()
    if world.is_main:
        store = TCPStore(addr, port, is_master=False, wait_for_workers=False)
        for key in (MANAGER_ADDR_KEY, REPLICA_ID_KEY):
            with contextlib.suppress(Exception):
                store.delete_key(key)
    dist.barrier()


def _pool_store(world: World) -> tuple[str | None, int | None]:
    """The address of this pool's store (the agent's, or torchrun's) where one exists."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return addr, int(port)
    return None, None

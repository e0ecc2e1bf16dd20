"""Guards: reliability checks that plug into the training loop's hook points.

    nonfinite   NaN/Inf loss or gradients: skip the update, retry, skip the batch, roll back
    spike       loss / gradient-norm spikes (median + MAD): roll back, skip the data window
    watchdog    a process beside each worker that kills it when its heartbeat stops
    straggler   per-rank lateness at the step's agreement point, flagged every K steps
    sdc         silent data corruption: replica fingerprints and recompute audits

Every guard judges a step at ``before_update`` (before the optimizer changes any
weight) by appending a Verdict to ``state.verdicts``; the loop agrees on the strongest
verdict over all ranks and acts on it (``anychip.train.loop``). This package's
``__init__`` stays free of torch so that the watchdog process starts fast.
"""


def install(state, hooks) -> None:
    """Register the guards ``state.cfg.guards`` enables."""
    from .setup import install as _install

    _install(state, hooks)

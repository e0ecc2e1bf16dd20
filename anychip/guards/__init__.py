"""Guards: reliability checks around every training step.

    nonfinite   NaN/Inf loss or gradients: skip the update, retry, skip the batch, roll back
    spike       loss / gradient-norm spikes (median + MAD): roll back, skip the data window
    watchdog    a process beside each worker that kills it when its heartbeat stops
    straggler   per-rank lateness at the step's agreement point, flagged every K steps
    sdc         silent data corruption: replica fingerprints and recompute audits

Each guard (``base.Guard``) judges the step in progress before the optimizer changes any
weight and returns a Verdict; ``setup.Guards.judge`` agrees on the strongest one over all
ranks and the loop carries it out (``anychip.train.verdicts``). This package's
``__init__`` imports nothing, so that the watchdog process starts fast (no torch).
"""

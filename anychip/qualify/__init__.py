"""Chip qualification (`anychip qualify`): where a device computes differently from a reference, and
where it is slow. numerics (error figures, limits, float64 truth), ops (the op suite), suite (running
it), collectives, parity (training steps), faults (deliberate errors), report (the card), run (the CLI)."""

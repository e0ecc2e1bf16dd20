"""The worker entry point: one rank of a training job.

    torchrun --nnodes 4 --nproc-per-node 8 ... -m anychip.launch my.toml [--set k=v ...] [--run-dir DIR]

``anychip train --nproc N`` starts N of these through torch's elastic launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config

FATAL = "fatal.json"  # written by a worker that stopped for a reason a restart cannot fix


def default_run_dir() -> Path:
    """runs/<torchelastic run id> under a launcher (the same on every rank and node),
    else runs/<date-time>."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return Path("runs") / run_id
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("several processes need one run directory: pass --run-dir (or torchrun --rdzv-id)")
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anychip.launch", description="one rank of an anychip job")
    p.add_argument("config", nargs="?", help="TOML file (default: the embedded default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", type=Path)
    a = p.parse_args(argv)
    from .device import DeviceError
    from .guards.base import GuardStop
    from .models.hf import CheckpointError
    from .train.loop import train

    try:
        run_dir = a.run_dir or default_run_dir()
        fatal = run_dir / FATAL
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt == 0 and int(os.environ.get("RANK", "0")) == 0:
            fatal.unlink(missing_ok=True)  # a new launch tries again
        if attempt and fatal.is_file():
            # an earlier attempt stopped for a reason that a restart cannot fix: do not retry it
            print(f"anychip: not retried: {json.loads(fatal.read_text())['error']}", file=sys.stderr)
            return 2
        cfg = load_config(a.config, a.sets)
        train(cfg, run_dir)
    except (ConfigError, FileNotFoundError, DeviceError, CheckpointError, GuardStop) as e:
        print(f"anychip: {e}", file=sys.stderr)  # a clear message, not a traceback
        if a.run_dir or os.environ.get("TORCHELASTIC_RUN_ID"):
            with contextlib.suppress(OSError):
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / FATAL).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

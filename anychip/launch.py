"""The worker entry point: one rank of a training job.

    torchrun --nnodes 4 --nproc-per-node 8 ... -m anychip.launch my.toml [--set k=v ...] [--run-dir DIR]

``anychip train --nproc N`` starts N of these through torch's elastic launcher.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config


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
    from .models.hf import CheckpointError
    from .train.loop import train

    try:
        cfg = load_config(a.config, a.sets)
        train(cfg, a.run_dir or default_run_dir())
    except (ConfigError, FileNotFoundError, DeviceError, CheckpointError) as e:
        print(f"anychip: {e}", file=sys.stderr)  # a clear message, not a traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preemption: how long from SIGTERM to `anychip train`'s exit, on the demo's config (`tiny`,
SFT, one worker under the elastic launcher), with the signal sent after each of a few steps.
Prints the wall time to exit, the step the run stopped after, and the workers' own part
(signal -> checkpoint committed -> `preempted` event).

    python bench/preempt.py [--at 37 100 151] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from anychip.events import read_jsonl

    p = argparse.ArgumentParser()
    p.add_argument("--at", type=int, nargs="+", default=[37, 100, 151], help="signal once this many steps are done")
    p.add_argument("--steps", type=int, default=600)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.at:
            run = Path(tmp) / f"at{k}"
            cmd = [
                sys.executable,
                "-m",
                "anychip.cli",
                "train",
                "--run-dir",
                str(run),
                "--set",
                f"train.steps={a.steps}",
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            while len(read_jsonl(run / "metrics.jsonl")) < k:
                if proc.poll() is not None:
                    sys.exit(f"the run ended before step {k}:\n{proc.stderr.read()[-3000:]}")
                time.sleep(0.02)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            wall = time.monotonic() - t0
            stop = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "preempted"]
            rows.append(
                {
                    "signal_after_step": k,
                    "exit_code": proc.returncode,
                    "exit_s": round(wall, 2),
                    "stopped_after_step": stop[0]["step"] if stop else None,
                    "workers_stop_s": round(stop[0]["stop_s"], 2) if stop else None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

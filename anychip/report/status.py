"""`anychip status`: the report's summary in the terminal."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from .run import Run
from .summary import fault_rows, overview

STYLE = {"finished": "green", "running": "blue", "failed": "red", "stopped": "red", "interrupted": "yellow"}


def print_status(run: Run, as_json: bool = False, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    rows = overview(run)
    faults = fault_rows(run)
    if as_json:
        columns = ["kind", "count", "injected", "detected", "median_latency", "lost"]
        print(json.dumps({"summary": dict(rows), "faults": [dict(zip(columns, f)) for f in faults]}, indent=1))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, f"[{STYLE[run.state]}]{value}[/]" if label == "state" else value)
    console.print(table)
    if faults:
        ft = Table("fault", "count", "injected", "detected", "median latency", "time lost", title="faults by kind")
        for row in faults:
            ft.add_row(*row)
        console.print(ft)

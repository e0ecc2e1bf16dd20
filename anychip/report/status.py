"""`anychip status`: the report's summary in the terminal. Reads no experts.jsonl, and of metrics.jsonl
only the figures it shows (STATUS_METRICS). Every value is printed as text, never as rich markup: paths,
error strings and config values may hold brackets; and with its control characters shown, not sent
(runread.printable): a run's files may hold terminal escape sequences."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..runread import printable
from .run import Run
from .summary import fault_rows, overview

STYLE = {"finished": "green", "running": "blue", "failed": "red", "stopped": "red", "interrupted": "yellow"}


def print_status(run: Run, as_json: bool = False, console: Console | None = None) -> None:
    """Print the summary and the faults by kind of ``run`` as tables (as JSON to stdout with ``as_json``)."""
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
        table.add_row(Text(label), Text(printable(value), style=STYLE[run.state] if label == "state" else ""))
    console.print(table)
    if faults:
        ft = Table("fault", "count", "injected", "detected", "median latency", "time lost", title="faults by kind")
        for row in faults:
            ft.add_row(*(Text(printable(cell)) for cell in row))
        console.print(ft)

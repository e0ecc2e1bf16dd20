"""A run at a glance: `anychip status` (terminal) and `anychip report` (one self-contained HTML page).
run.py reads a run directory (finished, failed or still going), summary.py condenses it, plots.py draws
it (matplotlib, inline SVG), page.py assembles the HTML."""

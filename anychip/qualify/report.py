"""The report card of `anychip qualify`: qualify.json, and the same findings as qualify.md and a
self-contained qualify.html, both rendered from one list of blocks (headings, paragraphs, tables)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .numerics import PASS, worst

Block = tuple  # ("h1" | "h2" | "p", text) or ("table", header, rows)


def write_report(report: dict, out: Path) -> list[Path]:
    """Write qualify.json, qualify.md and qualify.html into `out` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = card(report)
    paths = [out / "qualify.json", out / "qualify.md", out / "qualify.html"]
    paths[0].write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    paths[1].write_text(to_markdown(blocks))
    paths[2].write_text(to_html(blocks, f"anychip qualify: {report['target']['name']}"))
    return paths


def _finite(value):
    """The report with non-finite floats (a faulty device's errors) as the strings "inf" / "nan":
    standard JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def card(r: dict) -> list[Block]:
    t, ref, first = r["target"], r["reference"], r["ranks"][0]
    model = r["model"]
    shapes = (f"preset {model['preset']}" if model["preset"] else f"from {model['init']}") + (
        f": hidden {model['hidden_size']}, {model['layers']} layers, {model['experts']} routed experts, "
        f"vocabulary {model['vocab_size']}; op suite on {r['shape']['tokens']} tokens, sequences of {r['shape']['seq']}"
    )
    verdict = (
        f"**Verdict: {r['status'].upper()}**. Target {t['name']} ({t['type']}), reference {ref['name']} "
        f"({ref['type']}); every result is compared with float64 on the CPU from the same rounded inputs. "
        f"{r['date']}, torch {r['software']['torch']}, {r['software']['threads']} threads, "
        f"world size {r['world_size']}."
    )
    blocks: list[Block] = [
        ("h1", f"anychip qualify: {t['name']} ({t['type']})"),
        ("p", verdict),
        ("p", f"Model shapes: {shapes}."),
        ("p", f"Peaks used for % of peak ({t['peak_source']}): " + _peaks(t) + "."),
        ("p", f"Command: `{r['command']}`"),
    ]
    if t["type"] == ref["type"]:
        same_type = (
            "The reference is the target's own device type, so the error ratios are 1 unless a "
            "fault is injected: this card judges the device against float64 and the limits."
        )
        blocks.append(("p", same_type))
    if r["injected_fault"]:
        f = r["injected_fault"]
        injected = (
            f"**Injected fault:** `{f['op']}` on the target carries a relative error of "
            f"{f['relative_error']:g} (`--inject`), to show that the checks catch it."
        )
        blocks.append(("p", injected))
    problems = _problems(r)
    blocks.append(("h2", "Findings"))
    if problems:
        blocks.append(("table", ["rank", "check", "dtype", "status", "why"], problems))
    else:
        blocks.append(("p", "Every check passed."))
    if r["world_size"] > 1:
        rank_rows = [[k["rank"], k["device"]["name"], rank_status(k)] for k in r["ranks"]]
        blocks += [("h2", "Ranks"), ("table", ["rank", "device", "status"], rank_rows)]
    rank_0 = " (rank 0)" if r["world_size"] > 1 else ""
    checks = first["ops"] + first["collectives"]
    numerics_text = (
        "Relative error = ||y - y*|| / ||y*|| against float64 (the judged figure); ratio = target error "
        "/ reference error; cosine, max abs, max rel and the share of elements within 0.1% / 0.5% "
        "are the target's."
    )
    numerics_header = ["op", "dtype", "status", "target rel. error", "reference rel. error", "ratio"]
    numerics_header += ["cosine", "max abs", "max rel", "within 0.1%", "within 0.5%"]
    blocks += [
        ("h2", "Numerics" + rank_0),
        ("p", numerics_text),
        ("table", numerics_header, [_numerics_row(x) for x in checks]),
    ]
    speed_text = (
        "Median time of repeated calls; TFLOP/s for compute-bound ops, GB/s for memory-bound ones "
        "(bus bandwidth for collectives); % of the device's peak at that dtype (CPU: measured "
        "matmul and copy peaks; above 100% means the working set fits in cache)."
    )
    speed_header = ["op", "dtype", "target time", "target rate", "% of peak"]
    speed_header += ["reference time", "reference rate", "% of peak", "target speed / reference"]
    blocks += [
        ("h2", "Speed" + rank_0),
        ("p", speed_text),
        ("table", speed_header, [_speed_row(x) for x in checks]),
    ]
    for p in first["parity"]:
        blocks += _parity_blocks(p)
    blocks += _limits_blocks(r)
    blocks += [("h2", "Operations"), ("table", ["op", "what"], _what(first))]
    return blocks


def _peaks(device: dict) -> str:
    flops = [f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in device["peak_flops"].items() if v]
    bandwidth = device["peak_bandwidth"]
    return ", ".join(flops + [f"memory {bandwidth / 1e9:.3g} GB/s" if bandwidth else "memory n/a"]) or "n/a"


def rank_status(rank: dict) -> str:
    """The worst status of one rank's checks."""
    checks = rank["ops"] + rank["collectives"]
    return worst([x["status"] for x in checks] + [p["status"] for p in rank["parity"]])


def _problems(r: dict) -> list[list]:
    rows = []
    for k in r["ranks"]:
        for x in k["ops"] + k["collectives"]:
            if x["status"] != PASS:
                rows.append([k["rank"], x["op"], x["dtype"], x["status"], x["reason"]])
        for p in k["parity"]:
            for s in p["per_step"]:
                if s["status"] != PASS:
                    loss_error = s["loss_rel_error"]
                    why = (
                        f"worst gradient {s['worst_param']}: {s['worst_param_error_ratio']:.1f}x the "
                        f"reference's error; loss error {_e(loss_error['target'])} vs {_e(loss_error['reference'])}"
                    )
                    rows.append([k["rank"], f"step parity, step {s['step']}", p["dtype"], s["status"], why])
            d = p["first_divergent"]
            if d:
                why = (
                    f"`{d['module']}`: output error {_e(d['target_rel_error'])}, {d['error_ratio']:.1f}x "
                    f"the reference's ({_e(d['reference_rel_error'])})"
                )
                rows.append([k["rank"], "step parity, first divergent module", p["dtype"], d["status"], why])
    return rows


def _numerics_row(x: dict) -> list:
    t, ref = x["target"], x["reference"]
    return [
        x["op"],
        x["dtype"],
        x["status"],
        _e(t["rel_rms"]),
        _e(ref["rel_rms"]),
        f"{x['error_ratio']:.2f}",
        f"{t['cosine']:.8f}",
        _e(t["max_abs"]),
        _e(t["max_rel"]),
        f"{t['within_0_1pct']:.2%}",
        f"{t['within_0_5pct']:.2%}",
    ]


def _speed_row(x: dict) -> list:
    t, ref = x["target_speed"], x["reference_speed"]
    return [
        x["op"],
        x["dtype"],
        _time(t["seconds"]),
        _rate(t),
        _pct(t["peak_pct"]),
        _time(ref["seconds"]),
        _rate(ref),
        _pct(ref["peak_pct"]),
        f"{ref['seconds'] / t['seconds']:.2f}x" if t["seconds"] else "n/a",
    ]


def _parity_blocks(p: dict) -> list[Block]:
    d = p["first_divergent"]
    if d:
        layer = d["layer"] or "outside the transformer layers"
        where = (
            f"First module whose output diverges on the target: **`{d['module']}`** ({layer}): error "
            f"{_e(d['target_rel_error'])} against the reference's {_e(d['reference_rel_error'])} "
            f"({d['error_ratio']:.1f}x)."
        )
    else:
        where = (
            f"No module's output on the target is more than the pass ratio further from float64 than the "
            f"reference's ({p['modules_compared']} modules compared on the first forward pass)."
        )
    rows = [_parity_row(s) for s in p["per_step"]]
    text = (
        f"{p['steps']} training steps (AdamW, gradient clipping, bias update, as `anychip train`) from the "
        f"same weights on one batch of {p['batch']} x {p['seq']} tokens, autocast {p['dtype']}; on the target, "
        f"on the reference and in float64. {where}"
    )
    header = ["step", "status", "loss target", "loss reference", "loss float64"]
    header += ["loss rel. error target / ref.", "min gradient cosine target / ref.", "worst gradient (error ratio)"]
    return [
        ("h2", f"Step parity, {p['dtype']} ({p['status']})"),
        ("p", text),
        ("table", header, rows),
    ]


def _parity_row(s: dict) -> list:
    """One step's row of the step parity table."""
    loss, loss_error, cosine = s["loss"], s["loss_rel_error"], s["grad_cosine_min"]
    return [
        s["step"],
        s["status"],
        f"{loss['target']:.6f}",
        f"{loss['reference']:.6f}",
        f"{loss['float64']:.6f}",
        f"{_e(loss_error['target'])} / {_e(loss_error['reference'])}",
        f"{cosine['target']:.6f} / {cosine['reference']:.6f}",
        f"`{s['worst_param']}` {s['worst_param_error_ratio']:.2f}x",
    ]


def _limits_blocks(r: dict) -> list[Block]:
    lim = r["limits"]
    rows = [
        [dtype, f"<= {ok:.0e}", f"<= {bad:.0e}", f"> {bad:.0e}"] for dtype, (ok, bad) in lim["relative_error"].items()
    ]
    ok, bad = lim["error_ratio"]
    rows.append(["ratio to the reference's error (any dtype)", f"<= {ok:g}", f"<= {bad:g}", f"> {bad:g}"])
    ok, bad = lim["expert_agreement"]
    rows.append(["same experts chosen (router)", f">= {ok:.1%}", f">= {bad:.0%}", f"< {bad:.0%}"])
    text = (
        "A check's status is the worst of its figures. Step parity is judged by the ratio alone, for the "
        "loss and for every parameter's gradient."
    )
    return [
        ("h2", "Limits"),
        ("p", text),
        ("table", ["relative error against float64", "pass", "warn", "fail"], rows),
    ]


def _what(rank: dict) -> list[list]:
    seen = {}
    for x in rank["ops"] + rank["collectives"]:
        seen.setdefault(x["op"], x["what"])
    return [[k, v] for k, v in seen.items()]


def _e(value: float) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _rate(speed: dict) -> str:
    value = speed["rate_value"]
    return f"{value:.3g} {speed['rate_unit']}"


# -- renderers -----------------------------------------------------------------------------------


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        else:
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:110em}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.pass{background:#dff3df}td.warn{background:#fff1c2}td.fail{background:#f9d0d0}
code{font-size:90%}"""


def _inline(text: str) -> str:
    out = html.escape(str(text))
    for mark, tag in (("**", "b"), ("`", "code")):
        parts = out.split(mark)
        out = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(parts))
    return out


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        else:
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    page_head = f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
    page_head += f"<style>{_CSS}</style></head><body>\n"
    return page_head + "\n".join(body) + "\n</body></html>\n"


def _cell(value) -> str:
    text = str(value)
    cls = f' class="{text}"' if text in ("pass", "warn", "fail") else ""
    return f"<td{cls}>{_inline(text)}</td>"

#!/usr/bin/env python3
"""Turn the raw measurements of bench/run into latest.md, latest.json and latest.png.

Input:  --raw  JSON lines, one measurement per line:
               {"workload", "variant", "round", "value", "unit", ...extra}
        --meta JSON with machine / PostgreSQL / run metadata (written by bench/run)
Output: <out>/latest.md, <out>/latest.json, <out>/latest.png
"""
import argparse
import json
import math
import os
import statistics
import sys

VARIANT_ORDER = ["none", "floor", "event_floor", "plpgsql_jsonb", "pgaudit", "periods", "pg_subject_audit"]
BASELINES = ["none", "floor", "event_floor", "plpgsql_jsonb"]

VARIANT_DESC = {
    "none": "no auditing",
    "floor": "one ~300-byte row per affected row into an unindexed log table, same transaction (the cheapest conceivable in-database trail)",
    "event_floor": "one event row per affected row shaped as SPEC lays events out (subject_audit.event's columns, "
                   "a ~300-byte row, primary key from a sequence, a btree on the subject, a BRIN on txid), same "
                   "transaction: what the storage of events alone costs, before any capture or cryptography",
    "plpgsql_jsonb": "AFTER ROW trigger in PL/pgSQL: to_jsonb(OLD), to_jsonb(NEW), TG_OP, now(), session_user into a log table with a bigserial key",
    "pgaudit": "pgaudit.log = 'write' for the database (statement-level lines in the server log)",
    "periods": "periods extension, system versioning (history table, triggers)",
    "pg_subject_audit": "ours: subject_audit.track('customers', 'token'), encrypted per-subject events",
}


def workloads(meta):
    rows, bulk = meta["rows"], meta["bulk_rows"]
    return [
        ("a_update_sync_on", "(a) single-row UPDATE of 2 columns, synchronous_commit=on", "tps"),
        ("a_update_sync_off", "(a') single-row UPDATE of 2 columns, synchronous_commit=off", "tps"),
        ("b_insert", "(b) single-row INSERT, synchronous_commit=on", "tps"),
        ("c_bulk_update", f"(c) bulk UPDATE of {bulk:,} rows in one transaction", "ms"),
        ("d_copy", f"(d) COPY of {rows:,} rows into a fresh audited table", "ms"),
    ]


SHORT = {
    "a_update_sync_on": "(a) UPDATE\nsync on",
    "a_update_sync_off": "(a) UPDATE\nsync off",
    "b_insert": "(b) INSERT",
    "c_bulk_update": "(c) bulk\nUPDATE",
    "d_copy": "(d) COPY",
}


def fmt(x, unit):
    if x is None:
        return "—"
    if unit == "tps":
        return f"{x:,.0f}"
    if unit == "ms":
        return f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"
    return f"{x:,.1f}"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}×"


def percentile(sorted_vals, p):
    """Nearest-rank percentile."""
    if not sorted_vals:
        return None
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def summarize(records, wl_ids):
    out = {}
    for wl in wl_ids:
        per = {}
        for r in records:
            if r["workload"] == wl:
                per.setdefault(r["variant"], []).append(float(r["value"]))
        out[wl] = {
            v: {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}
            for v, vals in per.items()
        }
    return out


def ordered(variants):
    return [v for v in VARIANT_ORDER if v in variants] + sorted(v for v in variants if v not in VARIANT_ORDER)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    meta = json.load(open(a.meta))
    records = [json.loads(l) for l in open(a.raw) if l.strip()]
    wls = workloads(meta)
    summary = summarize(records, [w[0] for w in wls])

    # ratios: variant median / baseline median (raw), and cost ratio (time per operation) to none
    ratios = {}
    for wl, _, unit in wls:
        ratios[wl] = {}
        for v, s in summary[wl].items():
            ratios[wl][v] = {}
            for b in BASELINES:
                base = summary[wl].get(b)
                ratios[wl][v][b] = (s["median"] / base["median"]) if base and base["median"] else None
            r = ratios[wl][v]["none"]
            ratios[wl][v]["cost_vs_none"] = None if r in (None, 0) else (1.0 / r if unit == "tps" else r)

    e_recs = [r for r in records if r["workload"] == "e_read"]
    e_summary = []
    for r in e_recs:
        s = sorted(r["samples_ms"])
        counts = r.get("returned_counts") or []
        e_summary.append({
            "events_stored": r["events_stored"], "target": r["target"], "calls": len(s),
            "p50_ms": statistics.median(s), "p99_ms": percentile(s, 99), "min_ms": s[0], "max_ms": s[-1],
            "mean_ms": statistics.fmean(s), "first_call_ms": r["samples_ms"][0],
            "returned_min": min(counts) if counts else None, "returned_max": max(counts) if counts else None,
            "writer_sessions_per_subject": r.get("writer_sessions"),
        })
    f_recs = [r for r in records if r["workload"] == "f_bytes_per_event"]
    g_recs = [r for r in records if r["workload"] in ("g_ledger", "h_keys", "i_export")]

    os.makedirs(a.out, exist_ok=True)
    json.dump({"meta": meta, "summary": summary, "ratios": ratios, "e_read": e_summary,
               "reads_and_failures": summarize(records, ["j_point_select", "k_failure_capture"]),
               "f_bytes_per_event": f_recs, "raw": records},
              open(os.path.join(a.out, "latest.json"), "w"), indent=1)

    # ------------------------------------------------------------------ markdown
    L = []
    w = L.append
    w("# pg_subject_audit benchmark")
    w("")
    if meta.get("mock_ours"):
        w("> **MOCK RUN — harness self-test.** `pg_subject_audit` was replaced by a PL/pgSQL mock; "
          "its numbers say nothing about the extension.")
        w("")
    if meta.get("quick"):
        w("> **Quick mode** — small data, short runs, one round: indicative only, not for decisions.")
        w("")
    w(f"- Command: `{meta['command']}`")
    w(f"- Git commit: `{meta['git_commit']}`")
    w(f"- Date: {meta['date']}")
    w(f"- Machine: {meta['nproc']} CPUs ({meta['cpu_model']}), {meta['memory']} RAM, kernel {meta['kernel']}; "
      f"load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']} — the machine is shared, "
      "other people's work shows up as noise")
    w(f"- PostgreSQL: {meta['pg_version']}")
    w(f"- Run: {meta['rows']:,} customer rows, {meta['rounds']} round(s) of (a)–(d), {meta['duration_s']} s per pgbench run "
      f"(`pgbench -n -c 2 -j 2`), variants in rotating order per round; wall time {meta['wall_seconds_before_report']} s")
    w(f"- Variants: {', '.join(meta['variants'])}; pg_subject_audit preloaded: {meta['ours_preloaded']}")
    w("")
    w("Settings (`SHOW`):")
    w("")
    w("| setting | value |")
    w("|---|---|")
    for k, v in meta["settings"].items():
        w(f"| {k} | `{v}` |")
    w("")
    if meta.get("notes"):
        w("Notes:")
        w("")
        for n in meta["notes"]:
            w(f"- {n}")
        w("")

    w("## How to read this")
    w("")
    w("Each cell is the median over rounds (min and max beside it). Ratio columns divide this variant's median "
      "by the baseline's median. **TPS: higher is better**, so a ratio below 1 means fewer transactions per second "
      "than the baseline. **ms: lower is better**, so a ratio above 1 means slower than the baseline. "
      "The chart `latest.png` shows the *cost* relative to `none` for all workloads in one direction: time per "
      "operation (for TPS workloads none_TPS / variant_TPS), so higher bars are always worse.")
    w("")
    w("Variants:")
    w("")
    for v in ordered(meta["variants"]):
        w(f"- `{v}`: {VARIANT_DESC.get(v, '')}")
    w("")

    for wl, title, unit in wls:
        s = summary[wl]
        if not s:
            continue
        better = "higher is better" if unit == "tps" else "lower is better"
        w(f"## {title} — {unit.upper() if unit == 'tps' else unit} ({better})")
        w("")
        w(f"| variant | median {unit} | min | max | n | ÷ none | ÷ floor | ÷ event_floor | ÷ plpgsql_jsonb | cost vs none |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for v in ordered(s):
            st, rt = s[v], ratios[wl][v]
            w(f"| {v} | {fmt(st['median'], unit)} | {fmt(st['min'], unit)} | {fmt(st['max'], unit)} | {st['n']} | "
              f"{fmt_ratio(rt['none'])} | {fmt_ratio(rt['floor'])} | {fmt_ratio(rt['event_floor'])} | "
              f"{fmt_ratio(rt['plpgsql_jsonb'])} | "
              f"{fmt_ratio(rt['cost_vs_none'])} |")
        w("")

    w("## (e) pg_subject_audit read path — `audit_for_subject` latency, ms (lower is better)")
    w("")
    if not e_summary:
        w("Not measured in this run (pg_subject_audit not included).")
    else:
        w(f"`SELECT count(*) FROM subject_audit.audit_for_subject(token)` in one session after "
          f"`subject_audit.unlock(private_key)`; {meta['e_calls']} calls, each for a different subject with "
          "100 events (1 INSERT + 99 UPDATEs, each event written by a different session), autocommit, timed by psql "
          "`\\timing` (includes the client round trip over the unix socket). The first call of the session pays for "
          "cold caches (it is in the p99/max). Events were generated with bulk UPDATEs of the tracked table.")
        w("")
        w("| events stored | target | calls | p50 | p99 | min | max | mean | first call | rows returned per call | writer sessions per subject |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for e in e_summary:
            rr = "—" if e["returned_min"] is None else (
                f"{e['returned_min']}" if e["returned_min"] == e["returned_max"] else f"{e['returned_min']}–{e['returned_max']}")
            w(f"| {e['events_stored']:,} | {e['target']:,} | {e['calls']} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | "
              f"{e['min_ms']:.2f} | {e['max_ms']:.2f} | {e['mean_ms']:.2f} | {e['first_call_ms']:.2f} | {rr} | "
              f"{e['writer_sessions_per_subject']} |")
    w("")

    if g_recs:
        w("## (g) ledger, (h) keyring, (i) export — ms (lower is better)")
        w("")
        w("| measurement | events stored | ms |")
        w("|---|---:|---:|")
        for r in g_recs:
            what = {"seal": "`seal()` of all unsealed events", "verify": "`verify()` of the whole ledger",
                    "export": "`export_subject()` of one subject with this many events (first call after `unlock()`)"}.get(
                r.get("what"), f"new session: `unlock()` + first `audit_for_subject()` with {r.get('keys')} keys installed")
            w(f"| {what} | {r['events']:,} | {fmt(r['value'], 'ms')} |")
        w("")
    jk = summarize(records, ["j_point_select", "k_failure_capture"])
    jk_rows = [
        ("j_point_select", "none", "(j) point SELECT by primary key returning the subject column",
         {"none": "no auditing", "log_reads_subject": "ours, `log_reads = subject`",
          "log_reads_statement": "ours, `log_reads = statement`", "log_reads_off": "ours, `log_reads = off`"}),
        ("k_failure_capture", "log_failures_off", "(k) single-row UPDATE, synchronous_commit=off: failure capture on the success path",
         {"log_failures_off": "ours, `log_failures = off`", "log_failures_on": "ours, `log_failures = on` (default)"}),
    ]
    if any(jk[wl] for wl, *_ in jk_rows):
        w("## (j) reads of tracked tables, (k) failure capture — TPS (higher is better)")
        w("")
        w("Medians of the rounds, interleaved in one run; ratio to the first row of each block.")
        w("")
        w("| workload | configuration | TPS | ratio |")
        w("|---|---|---:|---:|")
        for wl, ref, title, labels in jk_rows:
            base = jk[wl].get(ref, {}).get("median")
            for v, label in labels.items():
                if v in jk[wl]:
                    m = jk[wl][v]["median"]
                    w(f"| {title} | {label} | {fmt(m, 'tps')} | {fmt_ratio(m / base if base else None)} |")
        w("")
    w("## (f) audit storage — bytes per event (lower is better)")
    w("")
    if not f_recs:
        w("Not measured.")
    else:
        what = {
            "floor": "pg_total_relation_size(floor_log) / rows",
            "event_floor": "pg_total_relation_size(event_floor) / rows",
            "plpgsql_jsonb": "pg_total_relation_size(audit_log) / rows",
            "periods": "pg_total_relation_size(customers_history) / rows (history rows: UPDATE/DELETE only)",
            "pg_subject_audit": "Σ pg_total_relation_size(tables in schema subject_audit) / count(subject_audit.event)",
        }
        w("| variant | when | bytes/event | events | audit bytes | what is counted |")
        w("|---|---|---:|---:|---:|---|")
        for r in sorted(f_recs, key=lambda r: (VARIANT_ORDER.index(r["variant"]) if r["variant"] in VARIANT_ORDER else 99, r["events"])):
            label = r.get("label", "")
            if label == "after_rounds":
                when = "after (a)–(d)"
            elif label.startswith("at_") and label.endswith("_events"):
                when = f"(e) at {int(label[3:-7]):,} events"
            else:
                when = label
            w(f"| {r['variant']} | {when} | {float(r['value']):,.0f} | {r['events']:,} | {r['relation_bytes']:,} | {what.get(r['variant'], '')} |")
        w("")
        w("`none` and `pgaudit` keep nothing in the database (pgaudit writes the server log).")
    w("")

    w("## Caveats")
    w("")
    w("- 2 cores shared with other users; pgbench uses 2 clients on the same 2 cores as the server. "
      "Differences below ~10% are within noise; look at min/max before trusting a ratio.")
    w("- With synchronous_commit=on, single-row TPS is bound by WAL flush latency of this disk, which hides CPU cost; "
      "the synchronous_commit=off run shows the CPU cost of each variant.")
    w("- Ratios come from this one run. `pgaudit` is preloaded in all variants (with pgaudit.log = 'none' except in "
      "its own database); pg_subject_audit, when preloaded, is loaded for all databases too.")
    w("- The `floor` pgbench scripts add the log row with a data-modifying CTE (same statement, same transaction, "
      "no extra round trip); for (c)/(d) the log rows are inserted by a second statement in the same transaction. "
      "`event_floor` does the same with event-shaped rows; its subjects in (c) are spread over the index by a hash "
      "of the row number (ours' subject keys are numbered in the random order the single-row UPDATEs first touch them), "
      "in (b) and (d) they are new and ascending, as ours' new keys are.")
    w("")
    open(os.path.join(a.out, "latest.md"), "w").write("\n".join(L))

    # ------------------------------------------------------------------ chart
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wl_ids = [wl for wl, _, _ in wls if summary[wl]]
    variants = [v for v in ordered({v for wl in wl_ids for v in summary[wl]}) if v != "none"]
    fig, ax = plt.subplots(figsize=(max(8, 1.9 * len(wl_ids) + 2), 5.2), dpi=110)
    width = 0.8 / max(1, len(variants))
    colors = {"floor": "#9e9e9e", "event_floor": "#76b7b2", "plpgsql_jsonb": "#f28e2b", "pgaudit": "#59a14f",
              "periods": "#b07aa1", "pg_subject_audit": "#4e79a7"}
    ymax = 1.0
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, wl in enumerate(wl_ids):
            c = ratios[wl].get(v, {}).get("cost_vs_none")
            if c is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(c)
        # bars grow from the 1x line: up = costlier than none, down = cheaper (noise, usually)
        ax.bar(xs, [y - 1.0 for y in ys], width * 0.92, bottom=1.0, label=v, color=colors.get(v))
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.2f}", ha="center", va="bottom" if y >= 1 else "top", fontsize=7, rotation=90)
            ymax = max(ymax, y)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(wl_ids)))
    ax.set_xticklabels([SHORT.get(wl, wl) for wl in wl_ids], fontsize=9)
    ax.set_ylabel("cost relative to none (time per operation, log scale)\n>1 = slower than no auditing")
    # log scale: ratios from 0.8x to 20x+ must stay readable side by side
    ax.set_yscale("log", base=2)
    ymin = min([0.5] + [ratios[wl][v]["cost_vs_none"] for wl in wl_ids for v in variants
                         if ratios[wl].get(v, {}).get("cost_vs_none")])
    ax.set_ylim(ymin * 0.8, ymax * 1.6)
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128) if ymin * 0.8 <= t <= ymax * 1.6]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}×" for t in ticks])
    ax.minorticks_off()
    title = f"pg_subject_audit bench — {meta['git_commit']} — {meta['date']}"
    if meta.get("quick"):
        title += " — QUICK"
    if meta.get("mock_ours"):
        title += " — MOCK"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=min(5, len(variants)), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "latest.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

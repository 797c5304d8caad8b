"""The markdown summary of one erasure batch, for the Prefect UI and the MLflow run."""

from __future__ import annotations


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def batch_markdown(summary: dict) -> str:
    """Render a batch summary, which contains counts, digests and metrics but no subject ids."""
    lines = [
        f"# Erasure batch `{summary['batch_id']}`",
        "",
        "| item | value |",
        "|---|---|",
        f"| requests | {summary['request_count']} |",
        f"| subjects (hashed digest) | {summary['subject_count']} (`{summary['subject_digest'][:16]}…`) |",
        f"| subjects with no data held | {summary['no_data_held']} |",
        f"| rows removed | {summary['rows_removed']} |",
        f"| data version | `{summary['data_md5_before']}` → `{summary['data_md5_after']}` |",
        f"| model version | {summary['model_version_before']} → {summary['model_version_after']} |",
        f"| method | {summary['method']} ({summary['method_reason']}) |",
        f"| tombstoned objects | {len(summary['tombstones'])} |",
        "",
        "## Metrics",
        "",
        "| metric | champion | new version |",
        "|---|---|---|",
    ]
    for key, value in summary["metrics_after"].items():
        lines.append(f"| {key} | {_fmt(summary['metrics_before'].get(key, '-'))} | {_fmt(value)} |")
    lines += ["", "## Gates", "", "| attempt | gate | value | max | result |", "|---|---|---|---|---|"]
    for attempt in summary["attempts"]:
        for gate in attempt["gates"]:
            verdict = "pass" if gate["passed"] else "**fail**"
            lines.append(f"| {attempt['method']} | {gate['name']} | {gate['value']:.3f} | {gate['threshold']:g} | {verdict} |")
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in summary["stage_seconds"].items():
        lines.append(f"| {stage} | {seconds:.2f} |")
    return "\n".join(lines) + "\n"

"""``bestformer zoo``: the pretrained models that ship with the package, as a table (or ``--json``), with the
command that reproduces each. ``bestformer eval zoo:NAME`` evaluates one; ``bestformer train --init zoo:NAME``
fine-tunes from one."""

from __future__ import annotations

import argparse
import json

HELP = "list the pretrained models that ship with the package (--json: as JSON)"

#: the table's columns
_COLUMNS = ("model", "tag", "dataset", "top-1", "split", "paper size", "file", "trained", "CPU")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="only the entries matching this pattern (fnmatch)")
    parser.add_argument("--json", action="store_true", help="print the entries as a JSON list")


def row(entry: dict) -> tuple[str, ...]:
    """The table's cells of one entry."""
    return (entry["model"], entry["tag"], entry["dataset"], f"{entry['top1']:.2f}%", entry["split"],
            _bytes(entry["paper_bytes"]), _bytes(entry["file_bytes"]), f"{entry['train_minutes']:.1f} min",
            entry["cpu_short"])


def _bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def table(entries: list[dict]) -> str:
    rows = [_COLUMNS, *(row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..zoo import list_pretrained

    entries = list_pretrained(args.pattern)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no zoo entry matches {args.pattern!r}")
        return 0
    print(table(entries))
    print("\nhow each was made (entry name = model.tag):")
    for e in entries:
        commands = "\n  ".join(e["command"].splitlines())
        print(f"{e['name']} ({e['cpu']}):\n  {commands}")
    print("\nevaluate one: bestformer eval zoo:NAME --data-dir DIR; load one: bestformer.load_pretrained(NAME); "
          "fine-tune: bestformer train --init zoo:NAME ...")
    return 0

"""What the command modules share: the state directory, the control call, output helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ..client import ControlClient
from ..units import format_size, parse_size

F = TypeVar("F", bound=Callable[..., Any])
PIPE_WIDTH = 1000


@dataclass
class CliContext:
    state_dir: Path


def state_dir(ctx: click.Context) -> Path:
    """The global --state-dir (set by the `shadowblk` group for every command)."""
    obj = ctx.find_object(CliContext)
    if obj is None:
        raise click.UsageError("no --state-dir: run this command through `shadowblk`")
    return obj.state_dir


def call(ctx: click.Context, op: str, *, timeout: float | None = None, **args: Any) -> Any:
    """One request to the service of the state directory; its result."""
    with ControlClient.connect(state_dir(ctx), timeout=timeout) as client:
        return client.call(op, **args)


class SizeType(click.ParamType):
    """A size: 4096, 64K, 1M, 1G, 15T, 64T (binary units)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail("a size must be positive", param, ctx)
        return size


SIZE = SizeType()


class DiffLimitType(click.ParamType):
    """--max-diff: a size, a percentage of the volume ("10%"), or "none" (volume set)."""

    name = "size|N%"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value).strip()
        if text == "none" or text.endswith("%"):
            return text
        return SIZE.convert(text, param, ctx)


DIFF_LIMIT = DiffLimitType()


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        fn
    )


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table for people; on a terminal long cells fold, into a pipe they stay whole."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPE_WIDTH)
    console.print(table)


def size_or_dash(size: int | None) -> str:
    return "-" if size is None else format_size(size)


SNAPSHOT_COLUMNS = ("name", "id", "set", "created", "state", "diff", "label", "mounted")


def snapshot_rows(snapshots: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [s["name"], s["id"], s["set"], s["created"], s["state"], format_size(s["diff_bytes"]),
         s.get("label") or "", ", ".join(s.get("mounted") or [])]
        for s in snapshots
    ]

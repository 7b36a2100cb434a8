"""STAR files as RELION reads and writes them: a small, lossless document model.

A :class:`StarDocument` is an ordered list of :class:`StarBlock` (``data_NAME``).
A block holds key-value pairs (``_rlnKey value``) and/or one loop (ordered
column names and rows). Names are stored **without** the leading underscore
(``"rlnAngleRot"``). Values are kept as the strings read (quotes removed), so
unknown blocks and columns survive a read/write round trip unchanged; typed
access (:meth:`StarBlock.column_as_float`, ...) converts on demand.

Format written (RELION 3.1 and later read it): ``# version 30001`` before each
block, no other comments, one loop row per line, values that need it quoted.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "StarBlock",
    "StarDocument",
    "read_star",
    "write_star",
    "star_text",
    "format_values",
]

log = logging.getLogger(__name__)

#: Written before each block, as RELION 3.1+ does.
VERSION_LINE = "# version 30001"

_RESERVED = re.compile(r"^(data_|loop_|save_|global_|stop_)", re.IGNORECASE)
#: Matches, in values joined by NUL, anything :func:`_needs_quotes` would flag:
#: whitespace, an empty value, or a value starting with a special character or
#: a reserved word.
_UNSAFE = re.compile(
    r"\s|(?:^|\x00)(?:[_#$;'\"]|(?:data|loop|save|global|stop)_|\x00|$)", re.IGNORECASE
)


def _needs_quotes(value: str) -> bool:
    return (
        value == ""
        or any(c.isspace() for c in value)
        or value[0] in "'\"_#$;"
        or _RESERVED.match(value) is not None
    )


def _quote(value: str) -> str:
    if not _needs_quotes(value):
        return value
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(
        f"STAR value {value!r} holds both quote characters; it cannot be written"
    )


def _quote_column(values: list[str]) -> list[str]:
    """Quote the values of a column that need it (one regex pass for the usual case)."""
    if values and _UNSAFE.search("\x00".join(values)) is None:
        return values
    return [_quote(v) for v in values]


def _aligned(values: list[str]) -> list[str]:
    """Right-justify a column's values to a common width (RELION-like layout)."""
    width = max(map(len, values), default=0)
    return [v.rjust(width) for v in values]


def format_values(values, fmt: str = "{:.6f}") -> list[str]:
    """Format numbers (or pass strings through) for a STAR column.

    Parameters
    ----------
    values : sequence of str, int or float
        Strings are kept; integers (and integer NumPy dtypes) are written with
        ``str``; other numbers with ``fmt``.
    fmt : str
        ``str.format`` pattern for floats (default 6 decimals, as RELION).
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "US":
        return [str(v) for v in arr.tolist()]
    if arr.dtype.kind == "O":
        return [v if isinstance(v, str) else fmt.format(v) for v in arr.tolist()]
    if arr.dtype.kind in "iub":
        return [str(int(v)) for v in arr.tolist()]
    return [fmt.format(v) for v in arr.astype(np.float64).tolist()]


class StarBlock:
    """One ``data_NAME`` block: key-value pairs and/or a loop table.

    Parameters
    ----------
    name : str
        Block name without ``data_`` (may be empty, as in RELION 3.0 files).
    pairs : dict of str to str, optional
        Key-value pairs, keys without the leading ``_``.
    columns : dict of str to sequence of str, optional
        Loop columns in order, names without ``_``; all of the same length.
        Giving ``columns`` (even empty) makes the block a loop.
    source : str or Path, optional
        File the block was read from, named in error messages.
    """

    def __init__(
        self,
        name: str,
        *,
        pairs: dict[str, str] | None = None,
        columns: dict[str, Sequence[str]] | None = None,
        n_rows: int | None = None,
        source=None,
    ) -> None:
        self.name = name
        self.pairs: dict[str, str] = dict(pairs or {})
        self.is_loop = columns is not None
        self._columns: dict[str, list[str]] = {
            k: list(v) for k, v in (columns or {}).items()
        }
        lengths = {len(v) for v in self._columns.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"data_{name}: loop columns have different lengths {sorted(lengths)}"
            )
        self._n_rows = lengths.pop() if lengths else int(n_rows or 0)
        self.source = None if source is None else str(source)

    # -- loop access -------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """Loop column names, in order, without the leading ``_``."""
        return list(self._columns)

    @property
    def n_rows(self) -> int:
        """Number of loop rows (0 for a pairs-only block)."""
        return self._n_rows

    def has_column(self, name: str) -> bool:
        return name in self._columns

    def column(self, name: str) -> list[str]:
        """The values of a loop column as strings (a copy).

        Raises
        ------
        InputError
            The block has no such column (the message names the file and block).
        """
        if name not in self._columns:
            raise InputError(
                self.source,
                f"table data_{self.name} has no column _{name}",
                f"add _{name} to the STAR file (columns present: "
                f"{', '.join(self._columns) or 'none'})",
            )
        return list(self._columns[name])

    def column_as_float(self, name: str) -> np.ndarray:
        """A loop column as float64, shape (n_rows,)."""
        return self._convert(name, self.column(name), np.float64)

    def column_as_int(self, name: str) -> np.ndarray:
        """A loop column as int64, shape (n_rows,) (values like ``2.000`` accepted)."""
        values = self.column(name)
        try:
            return np.array(values, dtype=np.int64)
        except ValueError:
            as_float = self._convert(name, values, np.float64)
            if not np.all(as_float == np.round(as_float)):
                bad = int(np.flatnonzero(as_float != np.round(as_float))[0])
                raise InputError(
                    self.source,
                    f"data_{self.name}, column _{name}, row {bad + 1}: "
                    f"{values[bad]!r} is not an integer",
                    "fix the value",
                ) from None
            return as_float.astype(np.int64)

    def _convert(self, name: str, values: list[str], dtype) -> np.ndarray:
        try:
            return np.array(values, dtype=dtype)
        except ValueError:
            for i, v in enumerate(values):
                try:
                    dtype(v)
                except ValueError:
                    raise InputError(
                        self.source,
                        f"data_{self.name}, column _{name}, row {i + 1}: "
                        f"{v!r} is not a number",
                        "fix the value",
                    ) from None
            raise

    def set_column(self, name: str, values, *, fmt: str = "{:.6f}") -> None:
        """Replace a loop column, or append it when absent.

        ``values`` are strings (kept) or numbers (formatted with :func:`format_values`).
        """
        strings = format_values(values, fmt)
        if not self.is_loop:
            if self.pairs:
                raise ValueError(
                    f"data_{self.name} is a key-value block; it has no loop"
                )
            self.is_loop = True
            self._n_rows = len(strings)
        if len(strings) != self._n_rows:
            raise ValueError(
                f"data_{self.name}: column _{name} has {len(strings)} values; "
                f"the loop has {self._n_rows} rows"
            )
        self._columns[name] = strings

    def remove_column(self, name: str) -> None:
        """Drop a loop column if present."""
        self._columns.pop(name, None)

    def rows(self) -> list[list[str]]:
        """The loop as a list of rows of strings."""
        return (
            [list(r) for r in zip(*self._columns.values(), strict=True)]
            if self._columns
            else [[] for _ in range(self._n_rows)]
        )

    def select_rows(self, indices) -> StarBlock:
        """A new block with the loop rows ``indices`` (in that order); pairs copied."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self._n_rows or idx.max() >= self._n_rows):
            raise IndexError(
                f"row indices out of range for data_{self.name} "
                f"with {self._n_rows} rows"
            )
        cols = {
            k: np.asarray(v, dtype=object)[idx].tolist()
            for k, v in self._columns.items()
        }
        return StarBlock(
            self.name,
            pairs=self.pairs,
            columns=cols if self.is_loop else None,
            n_rows=idx.size,
            source=self.source,
        )

    def copy(self) -> StarBlock:
        """An independent copy (strings are immutable, lists are copied)."""
        return StarBlock(
            self.name,
            pairs=self.pairs,
            columns=self._columns if self.is_loop else None,
            n_rows=self._n_rows,
            source=self.source,
        )

    # -- key-value access ----------------------------------------------------
    def value(self, key: str) -> str:
        """A key-value pair's value (string)."""
        if key not in self.pairs:
            raise InputError(
                self.source,
                f"block data_{self.name} has no _{key}",
                f"add _{key} to the block",
            )
        return self.pairs[key]

    def value_as_float(self, key: str) -> float:
        v = self.value(key)
        try:
            return float(v)
        except ValueError:
            raise InputError(
                self.source,
                f"data_{self.name}, _{key}: {v!r} is not a number",
                "fix the value",
            ) from None

    def set_value(self, key: str, value) -> None:
        """Set a key-value pair (numbers formatted like :func:`format_values`)."""
        self.pairs[key] = format_values([value])[0]

    def __eq__(self, other) -> bool:
        if not isinstance(other, StarBlock):
            return NotImplemented
        return (
            self.name == other.name
            and self.pairs == other.pairs
            and self.is_loop == other.is_loop
            and list(self._columns.items()) == list(other._columns.items())
            and self._n_rows == other._n_rows
        )

    def __repr__(self) -> str:
        kind = (
            f"loop {len(self._columns)} columns x {self._n_rows} rows"
            if self.is_loop
            else ""
        )
        pairs = f"{len(self.pairs)} pairs" if self.pairs else ""
        what = ", ".join(s for s in (pairs, kind) if s) or "empty"
        return f"StarBlock(data_{self.name}: {what})"


class StarDocument:
    """An ordered list of :class:`StarBlock`, addressed by name.

    Parameters
    ----------
    blocks : iterable of StarBlock
    source : str or Path, optional
        File the document was read from.
    """

    def __init__(self, blocks: Iterable[StarBlock] = (), *, source=None) -> None:
        self.blocks: list[StarBlock] = list(blocks)
        self.source = None if source is None else str(source)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def __contains__(self, name: str) -> bool:
        return any(b.name == name for b in self.blocks)

    def get(self, name: str, default=None) -> StarBlock | None:
        """The first block called ``name``, or ``default``."""
        return next((b for b in self.blocks if b.name == name), default)

    def __getitem__(self, name: str) -> StarBlock:
        block = self.get(name)
        if block is None:
            raise InputError(
                self.source,
                f"no data_{name} block (blocks present: "
                f"{', '.join('data_' + n for n in self.names) or 'none'})",
                f"give a STAR file with a data_{name} block",
            )
        return block

    def set_block(self, block: StarBlock) -> None:
        """Replace the block of the same name in place, or append it."""
        for i, b in enumerate(self.blocks):
            if b.name == block.name:
                self.blocks[i] = block
                return
        self.blocks.append(block)

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __eq__(self, other) -> bool:
        if not isinstance(other, StarDocument):
            return NotImplemented
        return self.blocks == other.blocks

    def __repr__(self) -> str:
        return f"StarDocument({', '.join(repr(b) for b in self.blocks)})"


# -- reading --------------------------------------------------------------------
def _tokens(line: str, path: Path, lineno: int) -> list[str]:
    """Split a line into values (STAR rules), stopping at a ``#`` comment.

    A quote opens a quoted value only at the start of a value and closes it
    only when followed by whitespace or the end of the line, so ``x'y`` is a
    plain value and ``'it's'`` is ``it's``. A ``#`` starts a comment only at
    the start of a value.
    """
    if "'" not in line and '"' not in line and "#" not in line:
        return line.split()
    tokens: list[str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace():
            i += 1
        elif c == "#":
            break
        elif c in "'\"":
            j = i + 1
            while True:
                j = line.find(c, j)
                if j < 0:
                    raise InputError(
                        path,
                        f"line {lineno}: no closing {c} in {line.strip()!r}",
                        "close the quoted value",
                    )
                if j + 1 == n or line[j + 1].isspace():
                    break
                j += 1
            tokens.append(line[i + 1 : j])
            i = j + 1
        else:
            j = i
            while j < n and not line[j].isspace():
                j += 1
            tokens.append(line[i:j])
            i = j
    return tokens


def read_star(path) -> StarDocument:
    """Read a STAR file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    StarDocument
        Blocks in file order; values as strings, quotes removed.

    Raises
    ------
    InputError
        Missing file; a loop row with the wrong number of values (names the
        line); text outside a block; a second loop in one block; a
        semicolon text field (unsupported).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "STAR file not found", "check the path and the current directory"
        )
    blocks: list[StarBlock] = []
    block = None  # dict: name, pairs, columns, rows, state
    state = "none"  # none | pairs | header | rows

    def finish():
        if block is None:
            return
        columns = None
        if block["columns"] is not None:
            names = block["columns"]
            rows = block["rows"]
            columns = (
                {
                    k: list(v)
                    for k, v in zip(names, zip(*rows, strict=True), strict=True)
                }
                if rows
                else {k: [] for k in names}
            )
        blocks.append(
            StarBlock(block["name"], pairs=block["pairs"], columns=columns, source=path)
        )

    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(";"):
                raise InputError(
                    path,
                    f"line {lineno}: semicolon text fields are not supported",
                    "write the value on one line",
                )
            lower = line[:5].lower()
            if lower == "data_":
                finish()
                block = {
                    "name": line.split()[0][5:],
                    "pairs": {},
                    "columns": None,
                    "rows": [],
                    "line": lineno,
                }
                state = "pairs"
                continue
            if block is None:
                raise InputError(
                    path,
                    f"line {lineno}: {line[:40]!r} appears before any data_ block",
                    "start the file with a data_NAME line",
                )
            if lower == "loop_":
                if block["columns"] is not None:
                    raise InputError(
                        path,
                        f"line {lineno}: a second loop_ in block "
                        f"data_{block['name']} is not supported",
                        "put each table in its own data_ block",
                    )
                block["columns"] = []
                state = "header"
                continue
            if line.startswith("_"):
                if state == "header":
                    block["columns"].append(line.split()[0][1:])
                    continue
                if state == "rows":
                    raise InputError(
                        path,
                        f"line {lineno}: key {line.split()[0]} after the rows "
                        f"of the loop in data_{block['name']}",
                        "move it before loop_ or into its own block",
                    )
                tokens = _tokens(line, path, lineno)
                if len(tokens) != 2:
                    raise InputError(
                        path,
                        f"line {lineno}: expected '_key value', got {line!r}",
                        "give one value per key",
                    )
                block["pairs"][tokens[0][1:]] = tokens[1]
                continue
            if state in ("header", "rows"):
                state = "rows"
                tokens = _tokens(line, path, lineno)
                if len(tokens) != len(block["columns"]):
                    raise InputError(
                        path,
                        f"line {lineno}: loop row of data_{block['name']} "
                        f"has {len(tokens)} values, "
                        f"expected {len(block['columns'])} (one per column)",
                        "repair or remove the line (a truncated or hand-edited file?)",
                    )
                block["rows"].append(tokens)
                continue
            raise InputError(
                path,
                f"line {lineno}: unexpected text {line[:40]!r} in data_{block['name']}",
                "check the STAR syntax",
            )
    finish()
    return StarDocument(blocks, source=path)


# -- writing --------------------------------------------------------------------
def _block_text(block: StarBlock) -> str:
    out = [VERSION_LINE, "", f"data_{block.name}", ""]
    if block.pairs:
        width = max(len(k) for k in block.pairs) + 1
        out += [f"_{k:<{width}} {_quote(v)}" for k, v in block.pairs.items()]
        out.append("")
    if block.is_loop:
        out.append("loop_")
        out += [f"_{name}" for name in block.columns]
        cols = [_aligned(_quote_column(block._columns[name])) for name in block.columns]
        out += [" ".join(row) for row in zip(*cols, strict=True)]
        out.append("")
    return "\n".join(out) + "\n"


def star_text(doc: StarDocument) -> str:
    """The text :func:`write_star` writes for ``doc``."""
    return "\n" + "\n".join(_block_text(b) for b in doc.blocks)


def write_star(path, doc: StarDocument) -> None:
    """Write a STAR document atomically (temporary file, then :func:`os.replace`).

    Parameters
    ----------
    path : str or Path
        Destination (overwritten if present).
    doc : StarDocument
    """
    path = Path(path)
    text = star_text(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name beside the target ("x": never reuse a file; usual permissions)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

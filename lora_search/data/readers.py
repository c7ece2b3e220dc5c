"""Strict readers for data files: every value is kept as the text the file holds, never re-typed.

`datasets`' loaders infer column types with pyarrow: a JSON column of ISO dates becomes a timestamp column
("1999-01-31" -> "1999-01-31 00:00:00") and a column mixing numbers and strings becomes numeric ("007" -> 7,
"1e3" -> 1000.0). These readers use `json` (numbers kept as their literal text), `csv` (every cell a string) and
pyarrow (only string, integer, float and boolean columns are read as text), so the model sees the file's text.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lora_search.core.errors import DataError

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> reader

NESTED_COLUMNS = ("messages", "conversations")  # CSV cells of these columns hold a JSON list of messages
# CSV cells of these columns hold text, or a JSON list of messages ([{"role": ..., "content": ...}], a dialogue):
# read as messages only when the whole cell is such a list, as text otherwise
MAYBE_NESTED = ("prompt", "completion", "chosen", "rejected")
# JSON numbers and constants (NaN, Infinity) as their literal text: 1e3 stays "1e3", 1.50 stays "1.50".
_DECODER = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str)


@dataclass
class Table:
    """Rows of one or more files, every value text (or lists/dicts of text), with where each row came from."""

    rows: list[dict]
    columns: list[str]
    places: list[str]  # per row: "line 3" (JSON Lines, CSV) or "row 3" (a JSON list, parquet)
    where: str  # "data.path 'x.jsonl'"
    untextable: dict = field(default_factory=dict)  # column -> its type, for columns that cannot be read as text


def as_text(value):
    """A decoded JSON value with booleans as "true"/"false" (numbers are text already), recursively."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return [as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: as_text(v) for k, v in value.items()}
    return value


def decode(data: bytes, where: str) -> str:
    """UTF-8 text (a BOM is dropped); DataError naming the byte offset and line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{where} is not UTF-8 text: byte {e.start} (line {line}) is 0x{data[e.start]:02x}; "
                        "save it as UTF-8") from None


def _columns(rows: list[dict]) -> list[str]:
    """Every key of any row, in order of first appearance; a row without a key gets None there (as datasets does)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    for r in rows:
        for k in columns:
            r.setdefault(k, None)
    return columns


def _objects(items: list, places: list[str], where: str) -> list[dict]:
    for item, place in zip(items, places):
        if not isinstance(item, dict):
            raise DataError(f"{where} {place}: expected a JSON object ({{\"column\": value, ...}}), "
                            f"got {type(item).__name__ if not isinstance(item, str) else 'a string'}")
    return [as_text(item) for item in items]


def read_json(text: str, where: str) -> Table:
    """A JSON list of objects, one JSON object, or JSON Lines (one object per line)."""
    stripped = text.strip()
    if not stripped:
        return Table([], [], [], where)
    try:
        whole = _DECODER.decode(text)  # surrounding whitespace is allowed: lines and columns stay the file's
    except json.JSONDecodeError as e:
        if stripped.startswith("["):
            raise DataError(f"{where}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        whole = None
    if isinstance(whole, list):
        places = [f"row {i + 1}" for i in range(len(whole))]
        rows = _objects(whole, places, where)
        return Table(rows, _columns(rows), places, where)
    if whole is not None:
        rows = _objects([whole], ["line 1"], where)
        return Table(rows, _columns(rows), ["line 1"], where)
    items, places = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(_DECODER.decode(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON on line {n}, column {e.colno}: {e.msg}") from None
        places.append(f"line {n}")
    rows = _objects(items, places, where)
    return Table(rows, _columns(rows), places, where)


def read_csv(text: str, where: str) -> Table:
    """Every cell as its text (empty cells are empty strings); messages/conversations cells as JSON lists."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows, places = None, [], []
    start = 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not cells:
            continue
        if header is None:
            header = cells
            dupes = sorted({c for c in cells if cells.count(c) > 1})
            if dupes:
                raise DataError(f"{where}: the header names column(s) {', '.join(dupes)} more than once")
            continue
        if len(cells) > len(header):
            raise DataError(f"{where} line {line}: {len(cells)} cells but the header has {len(header)} columns")
        row = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        for col in MAYBE_NESTED:
            if col in row:
                row[col] = _dialogue_or_text(row[col])
        for col in NESTED_COLUMNS:
            if row.get(col, "").strip():
                try:
                    row[col] = as_text(_DECODER.decode(row[col].strip()))
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} line {line}: column {col} must hold a JSON list of messages "
                                    f"([{{\"role\": ..., \"content\": ...}}]): {e.msg}") from None
        rows.append(row)
        places.append(f"line {line}")
    return Table(rows, header or [], places, where)


def _dialogue_or_text(cell: str):
    """A CSV cell that is exactly a JSON list of role/content messages, as that list; any other cell as its text."""
    if not cell.lstrip().startswith("[{"):
        return cell
    try:
        value = _DECODER.decode(cell.strip())
    except json.JSONDecodeError:
        return cell
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return as_text(value)
    return cell


def _scalar_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)) or value is None:
        return value if value is None or isinstance(value, str) else str(value)
    if isinstance(value, list):
        return [_scalar_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _scalar_text(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _textlike(t) -> bool:
    if pa.types.is_dictionary(t):
        return _textlike(t.value_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t))


def _nested_textlike(t) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _nested_textlike(t.value_type)
    if pa.types.is_struct(t):
        return all(_nested_textlike(t.field(i).type) for i in range(t.num_fields))
    return _textlike(t) or pa.types.is_null(t)


def arrow_table(table, where: str, place: str = "row") -> Table:
    """A pyarrow table as text: string columns as they are, numbers and booleans as their text (pyarrow's cast);
    list/struct columns of such values (messages) kept nested; other types recorded in `untextable`."""
    values, untextable = {}, {}
    for name, column in zip(table.column_names, table.columns):
        t = column.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            values[name] = column.to_pylist()
        elif _textlike(t):
            values[name] = pc.cast(column, pa.string()).to_pylist()  # 1.5 -> "1.5", True -> "true"
        elif _nested_textlike(t):
            values[name] = [_scalar_text(v) for v in column.to_pylist()]
        else:
            untextable[name] = str(t)
            values[name] = [None] * len(column)
    n = table.num_rows
    rows = [{k: values[k][i] for k in table.column_names} for i in range(n)]
    return Table(rows, list(table.column_names), [f"{place} {i + 1}" for i in range(n)], where, untextable)


def read_parquet(data: bytes, where: str) -> Table:
    """A parquet file through pyarrow (see arrow_table)."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"{where}: cannot read it as parquet: {str(e).splitlines()[0]}") from None
    return arrow_table(table, where)


def read_file(path: str, where: str, fmt: str | None = None) -> Table:
    """One file (a local path or an fsspec URL such as hf://...) in format fmt (default: from its suffix)."""
    fmt = fmt or DATA_SUFFIXES.get("." + str(path).rsplit(".", 1)[-1].lower())
    if fmt is None:
        raise DataError(f"{where}: unsupported file type {path!r}; accepted: {', '.join(DATA_SUFFIXES)}")
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{where}: cannot read {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if fmt == "parquet":
        return read_parquet(data, where)
    text = decode(data, where)
    return read_json(text, where) if fmt == "json" else read_csv(text, where)


def concat(tables: list[Table], where: str) -> Table:
    """Several files' tables as one (places name the file when there is more than one)."""
    if len(tables) == 1:
        return tables[0]
    rows, places, untextable = [], [], {}
    for t in tables:
        rows += t.rows
        places += [f"{t.where} {p}" for p in t.places]
        untextable.update(t.untextable)
    return Table(rows, _columns(rows) or (tables[0].columns if tables else []), places, where, untextable)


PACKAGED = ("json", "csv", "parquet")  # builders whose files these readers read themselves


def _unreachable(path: str, e: Exception) -> DataError:
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return DataError(f"data.path {path!r} (data.source=hub): cannot reach or find this dataset: {first.strip()} "
                     "(a hub id needs the network or a cached copy; a file: data=local data.path=<file>)")


def read_hub(path: str, subset: str | None, revision: str | None, splits: list[str]) -> dict[str, Table]:
    """The named splits of a hub dataset (or a local dataset folder): json/csv/parquet files through the strict
    readers; any other builder through `datasets.load_dataset`, its non-text columns recorded in `untextable`."""
    import datasets

    where = f"data.path {path!r}"
    try:
        builder = datasets.load_dataset_builder(path, name=subset, revision=revision)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:  # offline, no such repo, gated, bad name
        raise _unreachable(path, e) from None
    files = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
    out = {}
    for split in splits:
        label = where if split == splits[0] and len(splits) == 1 else f"{where} split {split}"
        if builder.name in PACKAGED and files:
            if split not in files:
                raise DataError(f"{where}: no split {split!r}; it has: {', '.join(files)}")
            out[split] = concat([read_file(f, f"{label} file {f.rsplit('/', 1)[-1]!r}", builder.name)
                                 for f in files[split]], label)
            continue
        try:
            ds = datasets.load_dataset(path, subset, split=split, revision=revision)
        except ValueError as e:
            raise DataError(f"{where}: cannot load split {split!r}: {str(e).splitlines()[0]}") from None
        except (ConnectionError, OSError) as e:
            raise _unreachable(path, e) from None
        out[split] = arrow_table(ds.data.table, label)
    return out


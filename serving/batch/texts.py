"""Which column holds the text, and each row's text or why it has none.

The column is the one asked for, else the one the bundle records it was trained on
(bundle.json `text_columns`, several joined with a space as training joins them),
else `text`, else `sentence` (GLUE's SST-2). A text is refused for what /predict
refuses it for: missing, not a string, empty or blank.
"""

from __future__ import annotations

from pathlib import Path

from serving.batch.readers import NOT_UTF8, BatchError, undecodable

FALLBACK_COLUMNS = ("text", "sentence")


def bundle_text_columns(meta: dict) -> tuple[str, ...]:
    recorded = meta.get("text_columns") or ()
    return (recorded,) if isinstance(recorded, str) else tuple(recorded)


def choose_text_columns(path: Path, columns: list[str], requested: str | None,
                        meta: dict) -> tuple[str, ...]:
    """The column(s) to read texts from; BatchError naming the file and the columns
    found when none fits."""
    found = ", ".join(map(repr, columns)) or "none"
    if requested is not None:
        if requested not in columns:
            raise BatchError(f"{path}: no column {requested!r} (columns: {found})")
        return (requested,)
    recorded = bundle_text_columns(meta)
    if recorded and all(name in columns for name in recorded):
        return recorded
    for name in FALLBACK_COLUMNS:
        if name in columns:
            return (name,)
    looked_for = [*([" + ".join(recorded)] if recorded else []), *FALLBACK_COLUMNS]
    raise BatchError(f"{path}: no text column: looked for {', '.join(looked_for)} "
                     f"(columns: {found}); name it with column=... (--column)")


def text_of(fields: dict, names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(text, None), or (None, why this row has no text the model may see)."""
    parts = []
    for name in names:
        if name not in fields:
            return None, f"no {name!r} field"
        value = fields[name]
        if value is None:
            continue
        if not isinstance(value, str):
            return None, f"{name!r} is {type(value).__name__}, not a string"
        parts.append(value)
    text = " ".join(parts)
    if not parts:
        return None, f"missing text in {' + '.join(map(repr, names))}"
    if not text.strip():
        return None, f"empty text in {' + '.join(map(repr, names))}"
    if undecodable([text]):  # escaped lone surrogates: the tokenizer cannot take them
        return None, NOT_UTF8
    return text, None

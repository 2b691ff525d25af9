"""Reading the project's Markdown in tests: tables under a heading, links, heading anchors."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(```|~~~)")


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked out (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(out)


def headings(text: str) -> list[str]:
    found, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.append(match.group(1))
    return found


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, and
    ``-1``, ``-2`` ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(text):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def table_under(text: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table after ``heading``, as rows keyed by the header cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^#+\s+{re.escape(heading)}\s*$",
                                                              line))
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            # A ``\|`` inside a cell is a literal pipe, not a column boundary.
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append([cell.strip().replace("\\|", "|") for cell in cells])
        elif rows:
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    header, _, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


def unquote(cell: str) -> str:
    return cell.strip().strip("`").strip()

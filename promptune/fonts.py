"""TrueType fonts found on this system, chosen per text by glyph coverage, so labels in any script are drawn.

Pillow's built-in font has basic Latin glyphs only: é, Ü or 日本 come out as empty boxes. No font is required: where
no system font has a text's glyphs, the one missing the fewest is used, and without any font file Pillow's built-in
one, with accents dropped where that helps (`drawable`). A glyph counts as missing when it renders exactly like the
font's "missing glyph" box.
"""

from __future__ import annotations

import os
import unicodedata
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

FONT_DIRS = (
    "/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",  # Linux, BSD
    "/System/Library/Fonts", "/Library/Fonts", "~/Library/Fonts",  # macOS
    os.path.join(os.environ.get("WINDIR", "C:/Windows"), "Fonts"),  # Windows
)
FONT_SUFFIXES = {".ttf", ".otf", ".ttc"}
# Regular sans-serif faces tried first, in this order; then every other font file by name, plain faces before styled.
PREFERRED = ("dejavusans", "notosans-regular", "liberationsans-regular", "arial", "helvetica", "segoeui", "verdana")
STYLED = ("bold", "italic", "oblique", "light", "thin", "black", "condensed", "mono", "serif", "emoji")
PROBE_SIZE = 16
NO_SUCH_CHARACTER = "\U0010fffd"  # a private-use code point: renders as the font's missing-glyph box


def font_for(text: str, size: int) -> Font:
    """The first system font that has a glyph for every character of `text` (else the one missing the fewest,
    else Pillow's built-in font), at `size` pixels."""
    path = _best_font(frozenset(ch for ch in text if not ch.isspace()))
    font = _sized(path, size) if path is not None else None
    return font if font is not None else ImageFont.load_default(size)


def drawable(text: str, font: Font) -> str:
    """`text` with each character `font` lacks replaced by its unaccented letters where the font has those
    (é -> e, Ü -> U); other missing characters stay (drawn as boxes)."""
    missing = set(missing_glyphs(font, text))
    if not missing:
        return text
    plain = {ch: "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)) for ch in missing}
    usable = {ch: base for ch, base in plain.items() if base and base != ch and not missing_glyphs(font, base)}
    return "".join(usable.get(ch, ch) for ch in text)


def missing_glyphs(font: Font, text: str) -> list[str]:
    """The characters of `text` that `font` draws as its missing-glyph box."""
    box = _render(font, NO_SUCH_CHARACTER)
    return [ch for ch in dict.fromkeys(text) if not ch.isspace() and _render(font, ch) == box]


@lru_cache(maxsize=1)
def font_files() -> tuple[Path, ...]:
    """Every font file under FONT_DIRS, preferred faces first (looked up once per process)."""
    found = set()
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if root.is_dir():
            found.update(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    return tuple(sorted(found, key=_preference))


def _preference(path: Path) -> tuple[int, int, str]:
    stem = path.stem.lower()
    preferred = PREFERRED.index(stem) if stem in PREFERRED else len(PREFERRED)
    return preferred, any(word in stem for word in STYLED), stem


@lru_cache(maxsize=None)
def _best_font(chars: frozenset[str]) -> Path | None:
    best, fewest = None, len(chars) + 1
    for path in font_files():
        font = _sized(path, PROBE_SIZE)
        if font is None:
            continue
        missing = sum(not _has_glyph(path, ch) for ch in chars)
        if missing < fewest:
            best, fewest = path, missing
        if missing == 0:
            break
    return best


@lru_cache(maxsize=None)
def _has_glyph(path: Path, ch: str) -> bool:
    return not missing_glyphs(_sized(path, PROBE_SIZE), ch)


@lru_cache(maxsize=None)
def _sized(path: Path, size: int) -> ImageFont.FreeTypeFont | None:
    try:
        return ImageFont.truetype(str(path), size)
    except (OSError, ValueError):  # unreadable file, or a bitmap-only face (colour emoji) that has no such size
        return None


def _render(font: Font, ch: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(ch)
    return mask.size, bytes(mask)

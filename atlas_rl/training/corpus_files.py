"""Finding and reading the files of the teacher-forced corpora (``atlas_rl/data/corpus_sources.json``).

A source names a root (``{stdlib}``, ``{purelib}`` or a path, ``~`` expanded), globs below it, exclusion
substrings, its license and how to read a file (``text``, ``html``: the ``<main>`` of a rendered book page with
``<pre>`` blocks kept as fenced code, ``metadata``: the long description of a wheel's ``METADATA``). Files whose
path names a public evaluation set, or whose text carries one of its markers, are never taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["CorpusFile", "CorpusSource", "find_files", "load_source_spec", "read_corpus_file", "source_manifest"]

MAX_FILE_BYTES = 400_000  # larger files are generated tables or bundles, not text a model answers with
_PERMISSIVE_METADATA = ("MIT", "BSD", "Apache", "PSF", "Python Software Foundation", "ISC")


@dataclass(frozen=True)
class CorpusSource:
    """One entry of ``corpus_sources.json``'s ``sources``."""

    name: str
    domain: str
    language: str
    license: str
    root: str
    globs: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    kind: str = "text"
    max_bytes: int = 1_000_000
    license_from: str | None = None
    license_allow: tuple[str, ...] = ()

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CorpusSource:
        if d.get("kind", "text") not in ("text", "html", "metadata"):
            raise ValueError(f"corpus source {d.get('name')!r}: kind must be text, html or metadata")
        return CorpusSource(
            name=str(d["name"]),
            domain=str(d["domain"]),
            language=str(d["language"]),
            license=str(d["license"]),
            root=str(d["root"]),
            globs=tuple(d["globs"]),
            exclude=tuple(d.get("exclude", ())),
            kind=str(d.get("kind", "text")),
            max_bytes=int(d.get("max_bytes", 1_000_000)),
            license_from=d.get("license_from"),
            license_allow=tuple(d.get("license_allow", ())),
        )

    def resolved_root(self) -> Path:
        root = self.root.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
        root = root.replace("{purelib}", sysconfig.get_paths()["purelib"])
        return Path(root).expanduser()


@dataclass(frozen=True)
class CorpusFile:
    """A file taken from a source: where it is, and its text as the corpus uses it."""

    source: CorpusSource
    path: Path
    rel: str
    text: str


def load_source_spec(path: str | Path | None = None) -> dict[str, Any]:
    """The parsed source list (``None``: the packaged ``atlas_rl/data/corpus_sources.json``)."""
    if path is None:
        text = resources.files("atlas_rl.data").joinpath("corpus_sources.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    spec = json.loads(text)
    if spec.get("format") != "atlas-rl/corpus-sources/v1":
        name = path or "corpus_sources.json"
        raise ValueError(f"{name} is not a corpus source list (format {spec.get('format')!r})")
    return spec


def _excluded(rel: str, patterns: tuple[str, ...] | list[str]) -> str | None:
    low = "/" + rel.lower()
    return next((p for p in patterns if p.lower() in low), None)


def find_files(
    source: CorpusSource, spec: dict[str, Any], seed: int = 0, stats: dict[str, int] | None = None
) -> list[CorpusFile]:
    """The files of ``source`` that pass every exclusion, in a seeded order, until ``max_bytes`` of text.

    ``stats`` (when given) counts what was left out: ``eval_path``, ``eval_content``, ``license``, ``excluded``,
    ``unreadable``.
    """
    stats = stats if stats is not None else {}
    root = source.resolved_root()
    if not root.is_dir():
        logger.warning("corpus source %s: %s is not a directory, skipped", source.name, root)
        return []
    ev = spec.get("eval_exclude", {})
    paths = sorted({p for g in source.globs for p in root.glob(g) if p.is_file()})
    order = sorted(paths, key=lambda p: hashlib.sha1(f"{seed}:{p.relative_to(root)}".encode()).hexdigest())
    out: list[CorpusFile] = []
    taken = 0
    for p in order:
        rel = str(p.relative_to(root))
        reason = _skip_reason(source, spec, ev, p, rel)
        text = read_corpus_file(source, p) if reason is None else None
        if reason is None and text is None:
            reason = "unreadable"
        if reason is None and any(m in text for m in ev.get("content_markers", ())):
            reason = "eval_content"
        if reason is not None:
            stats[reason] = stats.get(reason, 0) + 1
            continue
        out.append(CorpusFile(source, p, rel, text))
        taken += len(text.encode("utf-8"))
        if taken >= source.max_bytes:
            break
    return out


def _skip_reason(source: CorpusSource, spec: dict[str, Any], ev: dict[str, Any], p: Path, rel: str) -> str | None:
    full = f"{source.root}/{rel}"
    if _excluded(full, ev.get("path_patterns", ())):
        return "eval_path"
    if _excluded(rel, tuple(spec.get("exclude", ())) + source.exclude):
        return "excluded"
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            return "excluded"
    except OSError:
        return "unreadable"
    if source.license_from == "package.json" and _package_license(p) not in source.license_allow:
        return "license"
    return None


def read_corpus_file(source: CorpusSource, path: Path) -> str | None:
    """The text of ``path`` as the corpus uses it (by ``source.kind``), or None when unreadable or empty."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in text:
        return None
    if source.kind == "html":
        text = html_main_text(text, source.language)
    elif source.kind == "metadata":
        text = _metadata_description(text)
    text = text.replace("\r\n", "\n").strip("\n")
    return text if text.strip() else None


@lru_cache(maxsize=4096)
def _package_json_license(pkg: Path) -> str | None:
    try:
        lic = json.loads(pkg.read_text(encoding="utf-8")).get("license")
    except (OSError, ValueError):
        return None
    if isinstance(lic, dict):
        lic = lic.get("type")
    return str(lic) if lic else None


def _package_license(path: Path) -> str | None:
    """The ``license`` of the nearest ``package.json`` at or above ``path`` (npm packages)."""
    for d in [path.parent, *path.parents]:
        pkg = d / "package.json"
        if pkg.is_file():
            return _package_json_license(pkg)
        if d.name == "node_modules":
            break
    return None


def _metadata_description(text: str) -> str:
    """The long description of a wheel's METADATA when its license is permissive, else ``""``."""
    head, _, body = text.partition("\n\n")
    lic = [ln for ln in head.splitlines() if ln.startswith(("License", "Classifier: License"))]
    if not any(k in ln for ln in lic for k in _PERMISSIVE_METADATA) or any("GPL" in ln for ln in lic):
        return ""
    return body


class _MainText(HTMLParser):
    """Collects the text inside ``<main>`` (the whole body when there is none), ``<pre>`` blocks fenced."""

    _BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "table", "ul", "ol", "blockquote"}

    def __init__(self, fence: str) -> None:
        super().__init__(convert_charrefs=True)
        self.fence = fence
        self.parts: list[str] = []
        self.main_depth = 0
        self.seen_main = False
        self.pre = 0
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "main":
            self.main_depth += 1
            self.seen_main = True
        elif tag in ("script", "style", "nav", "button"):
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
            self.parts.append(f"\n```{self.fence}\n")
        elif tag in self._BLOCK and not self.pre:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "main":
            self.main_depth = max(0, self.main_depth - 1)
        elif tag in ("script", "style", "nav", "button"):
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self.parts.append("\n```\n")
        elif tag in self._BLOCK and not self.pre:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip or (self.seen_main and not self.main_depth):
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_main_text(html: str, language: str = "") -> str:
    """Readable text of a rendered documentation page: ``<main>`` only, code blocks fenced with ``language``."""
    start = html.find("<main")
    parser = _MainText(language)
    parser.feed(html[start:] if start >= 0 else html)
    parser.close()
    lines: list[str] = []
    fenced = False
    for ln in "".join(parser.parts).splitlines():
        if ln.startswith("```"):
            fenced = not fenced
        lines.append(ln.rstrip() if fenced else ln.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def source_manifest(files: list[CorpusFile]) -> str:
    """A hash of every taken file's source, path and text (changes whenever the corpus would)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.source.name}\x00{f.rel}\x00".encode())
        h.update(hashlib.sha1(f.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]

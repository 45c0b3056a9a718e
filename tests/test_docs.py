"""The README and docs/ link only to files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    slugs: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        if not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        n, unique = 0, slug
        while unique in slugs:
            n += 1
            unique = f"{slug}-{n}"
        slugs.add(unique)
    return slugs


def anchors(page: Path) -> set[str]:
    return heading_slugs(page.read_text(encoding="utf-8"))


def broken_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_slugs_follow_github():
    text = "# The built-in model: kinema-tiny\n## On a GPU\n## On a GPU\n```\n# not a heading\n```"
    assert heading_slugs(text) == {"the-built-in-model-kinema-tiny", "on-a-gpu", "on-a-gpu-1"}


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Here\n[ok](#here) [no](#there) [gone](b.md) [web](https://x)")
    assert broken_links(tmp_path / "a.md") == [
        "a.md: #there (no such heading)",
        "a.md: b.md (no such file)",
    ]


def test_readme_and_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += sorted((ROOT / "benchmarks" / "results").glob("README.md"))
    assert [b for page in pages for b in broken_links(page)] == []

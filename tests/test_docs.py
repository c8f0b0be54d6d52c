"""The documentation keeps in step with the code: every relative link and #anchor in README.md,
BENCHMARKS.md and docs/*.md leads somewhere, and docs/spec.md's reference is the schema's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.reference import SPEC_DOC, with_reference

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SOURCE = re.compile(r"""<(?:img|a)\s[^>]*?(?:src|href)=["']([^"']+)["']""")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercased, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_targets(markdown: str) -> list[str]:
    """Relative link targets of Markdown links and HTML img/a tags, outside code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = LINK.findall(prose) + HTML_SOURCE.findall(prose)
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def broken_links(document: Path) -> list[str]:
    """Each relative link of `document` whose file, folder or #anchor does not exist, with the reason."""
    broken = []
    for target in link_targets(document.read_text()):
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_anchor_leads_somewhere(document: Path) -> None:
    assert broken_links(document) == []


def test_the_docs_link_to_each_other() -> None:
    linked = {
        (document.parent / target.partition("#")[0]).resolve()
        for document in DOCUMENTS
        for target in link_targets(document.read_text())
    }
    unlinked = [doc.name for doc in DOCUMENTS[2:] if doc.resolve() not in linked]
    assert unlinked == [], "every page in docs/ is reachable from a link"


def test_slugs_follow_github() -> None:
    assert slug(
        "Gradient bias: mini-batch estimates of the global objective's gradient, against batch size"
    ) == ("gradient-bias-mini-batch-estimates-of-the-global-objectives-gradient-against-batch-size")
    assert slug("Live progress of `--local` runs") == "live-progress-of---local-runs"
    assert (
        slug("The quickstart: gamma 0.5 and 0.9 on the digits")
        == "the-quickstart-gamma-05-and-09-on-the-digits"
    )
    assert slug("What `status` shows for each phase") == "what-status-shows-for-each-phase"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#a-section) [here](#page) [web](https://example.org/x#y)\n"
        '[gone](missing.md) [bad anchor](other.md#no-section) <img src="figures/none.png">\n'
        "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#no-section: no heading with that anchor",
        "figures/none.png: no such file",
    ]


def test_spec_reference_is_generated_from_the_current_schema() -> None:
    document = SPEC_DOC.read_text()
    assert "<!-- spec-reference:start -->" in document and "| `gamma` |" in document
    assert with_reference(document) == document, "run: python -m launch.reference --write"

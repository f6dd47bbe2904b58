"""README.md and docs/*.md: every relative link and image points at a file that exists, every figure
README embeds is in assets/, README links to every page of docs/, and README stays a short guide
(at most 300 lines). Fast: reads text only."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 300

# [text](target) and ![alt](target), with an optional "title" after the target.
LINK = re.compile(r'(!?)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def links(text):
    """(is_image, target) for each markdown link or image outside code blocks and code spans."""
    found, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for bang, target in LINK.findall(CODE_SPAN.sub("", line)):
            found.append((bang == "!", target))
    return found


def local_path(page, target):
    """The file a relative link points at, or None for a web link, a mail link or a pure #anchor."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
        return None
    path = target.split("#", 1)[0].split("?", 1)[0]
    return os.path.normpath(os.path.join(os.path.dirname(page), path))


def test_the_link_reader_finds_links_and_skips_code():
    text = ("see [a](docs/a.md#x), ![f](assets/f.png \"t\"), [web](https://x.org), [here](#top)\n"
            "`[not](code.md)`\n```\n[no](fenced.md)\n```\n")
    assert links(text) == [(False, "docs/a.md#x"), (True, "assets/f.png"), (False, "https://x.org"), (False, "#top")]
    assert local_path(README, "docs/a.md#x") == os.path.join(ROOT, "docs", "a.md")
    assert local_path(README, "https://x.org") is None and local_path(README, "#top") is None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_points_at_a_file_that_exists(page):
    with open(page, encoding="utf-8") as f:
        found = links(f.read())
    broken = [target for _, target in found
              if (path := local_path(page, target)) is not None and not os.path.exists(path)]
    assert not broken, f"{os.path.relpath(page, ROOT)}: links to missing files: {broken}"


def test_every_figure_readme_embeds_is_in_assets():
    with open(README, encoding="utf-8") as f:
        images = [target for is_image, target in links(f.read()) if is_image]
    assert images, "README embeds no figure"
    assets = os.path.join(ROOT, "assets") + os.sep
    outside = [t for t in images if local_path(README, t) is None or not local_path(README, t).startswith(assets)]
    assert not outside, f"README embeds figures outside assets/: {outside}"


def test_readme_links_to_every_page_of_docs():
    with open(README, encoding="utf-8") as f:
        targets = {local_path(README, t) for _, t in links(f.read())}
    unlinked = [os.path.relpath(p, ROOT) for p in PAGES[1:] if os.path.normpath(p) not in targets]
    assert not unlinked, f"README does not link to {unlinked}"


def test_readme_is_at_most_300_lines():
    with open(README, encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}: move details to docs/"

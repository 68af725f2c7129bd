"""README.md and docs/: the README stays a ten-minute read, every link resolves (files and the
headings they point at), and every command a page gives names a script that exists."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:python|torchrun)\s+(?:-[-\w=]+\s+)*([\w./-]+\.py)\b")


def _read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _anchors(text):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


def test_the_readme_is_a_ten_minute_read():
    assert len(_read("README.md").splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_every_link_resolves(page):
    text = _read(page)
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        assert os.path.exists(resolved), f"{page}: {target} points at no file"
        if anchor and resolved.endswith(".md"):
            assert anchor in _anchors(_read(resolved)), f"{page}: {target} points at no heading"


@pytest.mark.parametrize("page", PAGES)
def test_every_command_names_a_script_that_exists(page):
    scripts = set(COMMAND.findall(_read(page)))
    missing = [s for s in scripts if not os.path.exists(os.path.join(ROOT, s))]
    assert not missing, f"{page} runs scripts that do not exist: {missing}"
    if page.startswith("docs"):  # each page opens with the commands that reproduce it
        assert scripts or "pytest" in _read(page), page


CODE_REFERENCE = re.compile(r"\b(README\.md|docs/[\w-]+\.md)(?:#([\w-]+))?")
VAGUE_REFERENCE = re.compile(r"README's|\(README\)|(?:README|docs/[\w-]+\.md), \"")


def test_every_reference_from_code_to_a_page_resolves():
    """Code points at a page as `docs/x.md` or at a heading as `docs/x.md#anchor` (GitHub's
    anchor); each page and heading exists, and no comment names a section in words."""
    sources = [os.path.join(d, f) for d, _, files in os.walk(ROOT) for f in files
               if f.endswith(".py") and not {".git", "results", "runs"} & set(d[len(ROOT):].split(os.sep))
               and f != os.path.basename(__file__)]  # this file spells the patterns out
    broken = []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        name = os.path.relpath(path, ROOT)
        broken += [f"{name}: {m[0]}" for m in VAGUE_REFERENCE.finditer(text)]
        for page, anchor in CODE_REFERENCE.findall(text):
            if not os.path.exists(os.path.join(ROOT, page)):
                broken.append(f"{name}: {page} does not exist")
            elif anchor and anchor not in _anchors(_read(page)):
                broken.append(f"{name}: {page}#{anchor} is no heading")
    assert len(sources) > 40 and not broken, broken

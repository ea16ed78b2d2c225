"""The documentation's links hold: every relative link in README.md and docs/*.md points at a file of
the repository, and every #anchor at a heading of the file it names (GitHub's rule for heading ids).
And its shape holds: the README stays at most 200 lines, every docs page opens with a paragraph saying
what it answers, and the experiment's marked blocks are where bench/experiment.py writes them."""
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")          # [text](target): the markdown inline link
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[str]:
    docs = os.path.join(REPO, "docs")
    return ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(docs) if name.endswith(".md"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced and indented code blocks: links and headings live there."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            out.append((number, line))
    return out


def anchor_of(heading: str) -> str:
    """GitHub's id for a heading: markup and punctuation dropped (letters, digits, spaces, '-' and '_'
    kept, Unicode letters included), lower case, each space a '-'."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading)              # code spans, bold, italics
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)                   # a link keeps its text
    text = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading id of a markdown file; repeated headings get -1, -2, … as on GitHub."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    seen, out = {}, set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            base = anchor_of(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(path: str) -> list[tuple[int, str]]:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    links = []
    for number, line in prose_lines(text):
        line = re.sub(r"`[^`]*`", "", line)                     # a code span is not a link
        links += [(number, target) for target in LINK.findall(line)
                  if not re.match(r"[a-z][a-z0-9+.-]*:", target)]      # http:, https:, mailto: are not checked
    return links


@pytest.mark.parametrize("path", markdown_files())
def test_every_relative_link_points_at_a_file_and_every_anchor_at_a_heading(path):
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(os.path.join(REPO, linked)):
            broken.append(f"{path}:{number}: {target}: no file {linked}")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{path}:{number}: {target}: no heading #{anchor} in {linked}")
    assert not broken, "\n".join(broken)


def test_anchor_of_follows_githubs_rule_on_this_projects_kinds_of_heading():
    assert anchor_of("6. The paper's numbers") == "6-the-papers-numbers"
    assert anchor_of("The experiment in miniature") == "the-experiment-in-miniature"
    assert anchor_of("GRPO or PPO?") == "grpo-or-ppo"
    assert anchor_of("What `python train.py` prints") == "what-python-trainpy-prints"
    assert anchor_of("3. The answer: seeds 1–3 (reported)") == "3-the-answer-seeds-13-reported"
    assert anchor_of("β and the **teacher** term") == "β-and-the-teacher-term"


def test_the_checker_finds_a_broken_file_link_and_a_broken_anchor(tmp_path, monkeypatch):
    """The checker itself: a made-up repository with one good and two broken links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Top\n\n## Two words\n\n[ok](#two-words) [ok](docs/a.md#a-b) "
                                        "[bad](docs/missing.md) [bad](#nowhere) `[not](a link)`\n\n"
                                        "    [indented](code.md)\n")
    (tmp_path / "docs" / "a.md").write_text("## A b\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    with pytest.raises(AssertionError) as failure:
        test_every_relative_link_points_at_a_file_and_every_anchor_at_a_heading("README.md")
    message = str(failure.value)
    assert "docs/missing.md: no file" in message and "#nowhere: no heading" in message
    assert "two-words" not in message and "a-b" not in message and "code.md" not in message


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_the_readme_is_read_in_five_minutes():
    """The README stays an overview; the detail lives in docs/ (issue 28)."""
    lines = read("README.md").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/ (at most 200)"


def opening_paragraph(text: str) -> list[str]:
    """The lines of the first block after a markdown file's `# Title`, if that block is a paragraph of
    prose (not a heading, list, table, code block, quote, image or HTML comment); else []."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    rest = lines[1:]
    while rest and not rest[0].strip():
        rest = rest[1:]
    block = []
    for line in rest:
        if not line.strip():
            break
        block.append(line)
    if not block or re.match(r"\s{4}|#|\||```|~~~|>|<|!\[|[-*+]\s|\d+[.)]\s", block[0]):
        return []
    return block


@pytest.mark.parametrize("path", [p for p in markdown_files() if p != "README.md"])
def test_every_docs_page_opens_with_a_paragraph_saying_what_it_answers(path):
    paragraph = opening_paragraph(read(path))
    assert len(" ".join(paragraph).split()) >= 8, \
        f"{path}: after its '# Title', a page opens with a paragraph (8 words or more) saying what it answers"


def test_opening_paragraph_rejects_a_page_without_a_title_or_one_that_opens_with_a_heading_or_table():
    assert opening_paragraph("# T\n\nThis page answers a question.\nSecond line.\n\n## A\n") == [
        "This page answers a question.", "Second line."]
    assert opening_paragraph("# T\n\n## A heading first\n\ntext\n") == []
    assert opening_paragraph("# T\n\n| a | b |\n|---|---|\n") == []
    assert opening_paragraph("# T\n\n- a list\n") == []
    assert opening_paragraph("No title\n\ntext\n") == []


def block_between(text: str, begin: str, end: str) -> list[str]:
    assert text.count(begin) == 1 and text.count(end) == 1, f"expected one {begin} and one {end}"
    start, stop = text.index(begin), text.index(end)
    assert start < stop, f"{begin} must come before {end}"
    return text[start + len(begin):stop].strip("\n").splitlines()


def test_the_experiments_blocks_are_where_bench_experiment_writes_them():
    """bench/experiment.py writes the whole table into docs/experiment.md and its main table (with its
    caption) into the README's headline block; both sets of markers must stay."""
    headline = block_between(read("README.md"), "<!-- experiment-headline:begin -->", "<!-- experiment-headline:end -->")
    full = block_between(read("docs/experiment.md"), "<!-- experiment:begin -->", "<!-- experiment:end -->")
    written_by = "<!-- written by bench/experiment.py --preset full; do not edit by hand -->"
    assert headline[0] == written_by and full[0] == written_by          # never the small preset's table
    assert "<!-- experiment:begin -->" not in read("README.md")     # the whole table lives in docs/ only

    def first_table(lines: list[str]) -> list[str]:
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        return lines[start:end]
    assert first_table(headline) == first_table(full), "the README's headline table is not the experiment's main table"

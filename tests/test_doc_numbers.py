"""Every study number README.md, docs/results.md and docs/replication.md quote agrees with the
stores in docs/data/ under the current verdict rule (``scripts/doc_numbers.py``; issue #13 item 9).
A failure lists the doc, the tag, the quoted and the recomputed text; ``python
scripts/doc_numbers.py --write`` rewrites the tagged numbers (then reread the prose around them)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import doc_numbers  # noqa: E402


def test_every_tagged_number_matches_the_stores():
    rows = doc_numbers.scan()
    assert len(rows) >= 150  # the tables and verdict lines of the three docs
    bad = [f"{doc}: {key}: quoted {quoted!r}, store gives {want!r}" for doc, key, quoted, want in rows
           if quoted != want]
    assert not bad, "\n".join(bad)


def test_each_doc_has_tags():
    docs = {doc for doc, *_ in doc_numbers.scan()}
    assert docs == set(doc_numbers.DOCS)


def test_a_stale_number_is_caught(tmp_path):
    for doc in doc_numbers.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / doc).write_text((ROOT / doc).read_text(encoding="utf-8"), encoding="utf-8")
    p = tmp_path / "docs" / "results.md"
    key = "paper-prednet-h200/cpu-4t/final_eval_mse/verdict"
    text = p.read_text(encoding="utf-8")
    assert f"<!--n:{key}-->inconclusive<!--/n-->" in text
    p.write_text(text.replace(f"<!--n:{key}-->inconclusive<!--/n-->", f"<!--n:{key}-->equivalent<!--/n-->"),
                 encoding="utf-8")
    bad = [r for r in doc_numbers.scan(tmp_path) if r[2] != r[3]]
    assert [(b[0], b[1]) for b in bad] == [("docs/results.md", key)]
    assert doc_numbers.write(tmp_path) == 1 and not [r for r in doc_numbers.scan(tmp_path) if r[2] != r[3]]


def test_every_store_the_docs_name_is_in_the_repository():
    """A store the docs cite (``docs/data/NAME.db``) must exist and be tracked: *.db is ignored
    elsewhere, and a store left untracked is lost to every other checkout."""
    import re
    import subprocess

    tracked = set(subprocess.run(["git", "ls-files", "docs/data"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    if not tracked:  # not a git checkout (e.g. an unpacked sdist): existence is all that can be checked
        tracked = {str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "data").glob("*.db")}
    cited = set()
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"docs/data/([\w.{},-]+?\.db)\b", md.read_text()):
            if "{" in name:  # docs/data/dropout-{device,portable}-h200.db
                head, alts, tail = re.match(r"(.*)\{(.*)\}(.*)", name).groups()
                cited |= {(md.name, f"docs/data/{head}{a}{tail}") for a in alts.split(",")}
            elif name != "NAME.db":  # the placeholder in "docs/data/NAME.db"
                cited.add((md.name, f"docs/data/{name}"))
    missing = sorted(f"{doc} cites {path}" for doc, path in cited if path not in tracked)
    assert not missing, "stores cited but not in the repository (git add -f them):\n" + "\n".join(missing)

#!/usr/bin/env python3
"""Every relative link in README.md and docs/**/*.md resolves to a tracked file.

  check_links.py SOURCE_DIR

A link [text](path) or [text](path#anchor), or a reference definition
"[id]: path", whose path is not a URL must name a file (or directory) that git
tracks; a target that exists but is ignored by .gitignore is reported with the
pattern that hides it (the way docs/crash-safety.md was once lost). An
#anchor, in the same file or another tracked Markdown file, must match a
heading there (GitHub's slugs). Links in fenced code blocks and in `code
spans` are not links.
Exit: 0 all resolve; 1 some do not (each printed); 77 not a git checkout
(the reason printed: a source tarball cannot say what is tracked).
"""
import os
import re
import subprocess
import sys

INLINE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def git(src, *args):
    return subprocess.run(["git", "-C", src, *args], capture_output=True, text=True)


def strip_code_spans(line):
    return re.sub(r"(`+)(.+?)\1", "", line)


def markdown_lines(path):
    """(line number, text) outside fenced code blocks."""
    fence = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            m = FENCE.match(line)
            if m:
                mark = m.group(1)[0] * 3
                if fence is None:
                    fence = mark
                    continue
                if mark == fence:
                    fence = None
                    continue
            if fence is None:
                yield n, line.rstrip("\n")


def slug(text):
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for _, line in markdown_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    src = os.path.abspath(sys.argv[1])
    r = git(src, "ls-files", "-z")
    if r.returncode != 0:
        print(f"SKIP: {src} is not a git checkout, so 'tracked' cannot be checked: "
              f"{r.stderr.strip()}")
        return 77
    tracked = set(p for p in r.stdout.split("\0") if p)
    tracked_dirs = set()
    for p in tracked:
        d = os.path.dirname(p)
        while d:
            tracked_dirs.add(d)
            d = os.path.dirname(d)

    docs = ["README.md"] if os.path.exists(os.path.join(src, "README.md")) else []
    for root, _, files in os.walk(os.path.join(src, "docs")):
        docs += [os.path.relpath(os.path.join(root, f), src) for f in files if f.endswith(".md")]
    docs.sort()

    problems, nlinks, cache = [], 0, {}
    for doc in docs:
        if doc not in tracked:
            problems.append(f"{doc}: not tracked by git{ignored_by(src, doc)}")
        # Fenced lines blanked, so that a link's text may wrap across lines
        # and line numbers still count.
        lines = {n: strip_code_spans(t) for n, t in markdown_lines(os.path.join(src, doc))}
        text = "\n".join(lines.get(n, "") for n in range(1, max(lines, default=0) + 1))
        found = [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE.finditer(text)]
        found += [(n, m.group(1)) for n, t in lines.items() for m in [REFDEF.match(t)] if m]
        for n, t in sorted(found):
            if URL.match(t) or t.startswith("//"):
                continue
            nlinks += 1
            path, _, frag = t.partition("#")
            if path:
                rel = os.path.normpath(os.path.join(os.path.dirname(doc), path))
                if path.startswith("/"):
                    rel = os.path.normpath(path.lstrip("/"))
            else:
                rel = doc
            where = f"{doc}:{n}: link '{t}'"
            if rel.startswith(".."):
                problems.append(f"{where}: points outside the source tree")
                continue
            if rel not in tracked and rel not in tracked_dirs:
                if os.path.exists(os.path.join(src, rel)):
                    problems.append(f"{where}: {rel} exists but is not tracked by git"
                                    f"{ignored_by(src, rel)}")
                else:
                    problems.append(f"{where}: {rel} does not exist")
                continue
            if frag and rel.endswith(".md"):
                if rel not in cache:
                    cache[rel] = anchors(os.path.join(src, rel))
                if frag not in cache[rel]:
                    problems.append(f"{where}: no heading with anchor #{frag} in {rel}")
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        print(f"{len(problems)} broken of {nlinks} relative links in {len(docs)} documents")
        return 1
    print(f"OK: {nlinks} relative links in {len(docs)} documents resolve to tracked files")
    return 0


def ignored_by(src, rel):
    r = git(src, "check-ignore", "-v", "--no-index", rel)
    if r.returncode == 0 and r.stdout.strip():
        src_line_pattern = r.stdout.split("\t")[0]
        return f" (ignored by {src_line_pattern})"
    return ""


if __name__ == "__main__":
    sys.exit(main())

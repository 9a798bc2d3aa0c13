#!/usr/bin/env python3
"""Turn one of cbt's docs/*.md pages into a man page (roff, -man macros).

The man pages are generated from the docs at build time (man/CMakeLists.txt)
so the two cannot drift: the docs are the single source. Only the Markdown
the docs use is understood: ATX headings, paragraphs, ``` code blocks,
tables (rendered as tagged paragraphs: first cell the tag), "-" / "1." lists,
`code`, **bold**, *italic* and [links](target) (the text is kept; a link to
another page becomes "text (see TARGET)" when the text does not name it).

  md2man.py --name NAME --section 1 --summary TEXT [--date D] [--version V]
            [--see-also PAGE(S),...] IN.md OUT.1

The first level-1 heading is replaced by NAME's NAME section; level-2
headings become .SH (upper case), level-3 and below .SS. With --see-also,
the page ends in a SEE ALSO section naming those pages as man references
(the document's own "See also" section, which names docs/ files, is left
out), then the document the page was made from.
"""
import argparse
import re
import sys


def esc(text):
    """Escape roff specials in plain text (not yet formatted)."""
    text = text.replace("\\", "\\e")
    text = text.replace("-", "\\-")
    # Non-ASCII as groff Unicode escapes: no preconv needed (man -l, groff).
    return "".join(c if ord(c) < 128 else "\\[u%04X]" % ord(c) for c in text)


def line_start(text):
    """A line must not start with . or ' (roff requests)."""
    if text.startswith(".") or text.startswith("'"):
        return "\\&" + text
    return text


INLINE = re.compile(r"(`+)(.+?)\1|\*\*(.+?)\*\*|(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])|"
                    r"\[([^\]]+)\]\(([^)]+)\)")


def inline(text):
    out = []
    pos = 0
    for m in INLINE.finditer(text):
        out.append(esc(text[pos:m.start()]))
        if m.group(2) is not None:
            out.append("\\fB" + esc(m.group(2).strip()) + "\\fR")
        elif m.group(3) is not None:
            out.append("\\fB" + inline(m.group(3)) + "\\fR")
        elif m.group(4) is not None:
            out.append("\\fI" + inline(m.group(4)) + "\\fR")
        else:
            label, target = m.group(5), m.group(6)
            out.append(inline(label))
            page = target.split("#")[0]
            if page and not page.startswith("http") and page not in label:
                out.append(" (see " + esc(page) + ")")
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def cells(row):
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    parts = re.split(r"(?<!\\)\|", row)
    return [p.strip().replace("\\|", "|") for p in parts]


def see_also(refs, src):
    """The SEE ALSO section: .BR lines, "page (n)," each (by section, then
    name), the last without a comma; then where the page comes from."""
    out = ['.SH "SEE ALSO"']
    parsed = []
    for ref in refs:
        m = re.fullmatch(r"([A-Za-z0-9_.+-]+)\((\w+)\)", ref.strip())
        if not m:
            raise SystemExit("md2man.py: --see-also: '%s' is not PAGE(SECTION)" % ref)
        parsed.append((m.group(1), m.group(2)))
    parsed.sort(key=lambda r: (r[1], r[0]))  # man-pages(7): by section, then name
    for n, (page, sect) in enumerate(parsed):
        out.append(".BR %s (%s)%s" % (esc(page), sect, "," if n + 1 < len(parsed) else ""))
    out.append(".PP")
    out.append("This page is made from %s of the cbt sources. The documents it names"
               " (\\fIbackup.md\\fP, \\fIcontrol.md\\fP, ...) are installed in"
               " \\fIshare/doc/nbdkit-cbt\\fP under the install prefix"
               " (\\fI/usr/share/doc/nbdkit-cbt\\fP from the Debian package)." % esc("docs/" + src))
    return out


def convert(md, name, section, summary, date, version, refs=(), src=""):
    out = [
        '.TH "%s" "%s" "%s" "cbt %s" "cbt"' % (name.upper(), section, date, version),
        ".SH NAME",
        "%s \\- %s" % (esc(name), esc(summary)),
    ]
    lines = md.splitlines()
    i = 0
    seen_title = False
    pending_desc = []  # the title's DESCRIPTION heading, until content comes
    para = []
    skip = False  # inside the document's own "See also" (replaced by refs)

    def content():
        if pending_desc:
            out.append(pending_desc.pop())

    def flush():
        if para:
            content()
            out.append(".PP")
            out.append(line_start(inline(" ".join(para))))
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        h = re.match(r"^(#{1,2})\s+(.*)$", line)
        if h and refs:
            skip = h.group(2).strip().lower() == "see also"
            if skip:
                flush()
        if skip:
            i += 1
            continue
        if stripped.startswith("```"):
            flush()
            content()
            out.append(".PP")
            out.append(".RS 2")
            out.append(".nf")
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                out.append(line_start(esc(lines[i])))
                i += 1
            out.append(".fi")
            out.append(".RE")
            i += 1
            continue
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m:
            flush()
            level, title = len(m.group(1)), m.group(2).strip()
            if level == 1 and not seen_title:
                seen_title = True
                pending_desc.append(".SH DESCRIPTION")
            elif level <= 2:
                pending_desc.clear()
                out.append('.SH "%s"' % inline(title).upper().replace('"', "'"))
            else:
                out.append('.SS "%s"' % inline(title).replace('"', "'"))
            i += 1
            continue
        if stripped.startswith("|"):
            flush()
            content()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            if len(rows) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in rows[1]):
                header, body = rows[0], rows[2:]
            else:
                header, body = None, rows
            if header and len(header) > 2:
                out.append(".PP")
                out.append(line_start(inline(" | ".join(header))))
            for r in body:
                out.append(".TP")
                out.append(line_start(inline(r[0])))
                rest = r[1:]
                if header and len(header) > 2:
                    rest = ["%s: %s" % (h, c) for h, c in zip(header[1:], rest)]
                out.append(line_start(inline("; ".join(rest) if len(rest) > 1 else
                                             (rest[0] if rest else ""))))
            continue
        m = re.match(r"^(\s*)([-*]|\d+\.)\s+(.*)$", line)
        if m:
            flush()
            content()
            bullet = "\\(bu" if m.group(2) in "-*" else m.group(2)
            item = [m.group(3)]
            i += 1
            while (i < len(lines) and lines[i].strip() and
                   not re.match(r"^\s*([-*]|\d+\.)\s+", lines[i]) and
                   not lines[i].strip().startswith(("```", "|", "#"))):
                item.append(lines[i].strip())
                i += 1
            out.append('.IP "%s" 3' % bullet)
            out.append(line_start(inline(" ".join(item))))
            continue
        if not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    if refs:
        out.extend(see_also(refs, src))
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--section", default="1")
    ap.add_argument("--summary", required=True)
    ap.add_argument("--date", default="")
    ap.add_argument("--version", default="")
    ap.add_argument("--see-also", default="",
                    help="comma-separated man pages, e.g. cbt(1),nbdkit(1)")
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args()
    with open(a.src, encoding="utf-8") as f:
        md = f.read()
    refs = [r for r in a.see_also.split(",") if r.strip()]
    page = convert(md, a.name, a.section, a.summary, a.date, a.version, refs,
                   a.src.replace("\\", "/").rsplit("/", 1)[-1])
    with open(a.dst, "w", encoding="utf-8") as f:
        f.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())

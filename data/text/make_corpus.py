#!/usr/bin/env python3
"""Turn the Python documentation's reStructuredText sources into a plain-text corpus.

Usage:
    python data/text/make_corpus.py /path/to/_sources data/text/corpus.txt

The input is the ``_sources`` folder of the Sphinx HTML build shipped in Debian's
``python3.11-doc`` package (files named ``*.rst.txt``).  The output has one
document per line: each line is one prose paragraph, with its wrapped lines
joined by single spaces and inline markup lightly simplified.

What is kept and dropped (a deliberately simple, line-based approximation of RST):
  * kept: ordinary paragraphs, list items, bodies of directives such as
    ``.. function::``, ``.. note::`` or ``.. versionchanged::``;
  * dropped: literal (code) blocks after ``::``, doctest paragraphs (``>>>``),
    directive / comment / target lines (``..``) and the bodies of code-like
    directives, section titles and their underlines, grid and simple tables,
    and paragraphs that are short or have few letters.

Files are read in sorted path order, so the output is byte-for-byte reproducible.
Only the standard library is used.
"""

import argparse
import re
import sys
from pathlib import Path

# Top-level parts of the documentation included by default (folders, or file
# stems for top-level files such as glossary.rst.txt).  c-api, distutils,
# extending, install etc. are left out so the corpus stays around 4-8 MB.
DEFAULT_PARTS = (
    'faq',
    'glossary',
    'howto',
    'library',
    'reference',
    'tutorial',
    'using',
    'whatsnew',
)

MIN_CHARS = 40  # drop paragraphs shorter than this (after cleanup)
MIN_WORDS = 6  # ... or with fewer words than this
MIN_LETTER_RATIO = 0.7  # ... or whose non-space characters are mostly not letters

# Directives whose indented body is code, markup or metadata rather than prose.
SKIP_BODY = {
    'code',
    'code-block',
    'sourcecode',
    'literalinclude',
    'include',
    'doctest',
    'testcode',
    'testsetup',
    'testcleanup',
    'testoutput',
    'productionlist',
    'index',
    'toctree',
    'highlight',
    'raw',
    'math',
    'table',
    'csv-table',
    'list-table',
    'tabularcolumns',
    'image',
    'figure',
    'moduleauthor',
    'sectionauthor',
    'audit-event',
    'audit-event-table',
    'availability',
}
# Directives whose text on the directive line itself is prose (after the
# given number of leading arguments, e.g. the version number).
PROSE_DIRECTIVES = {
    'note': 0,
    'warning': 0,
    'seealso': 0,
    'important': 0,
    'tip': 0,
    'caution': 0,
    'attention': 0,
    'hint': 0,
    'danger': 0,
    'error': 0,
    'impl-detail': 0,
    'versionadded': 1,
    'versionchanged': 1,
    'deprecated': 1,
    'deprecated-removed': 2,
}

DIRECTIVE_RE = re.compile(r'^\.\.\s+([\w:.-]+)::(?:\s+(.*))?$')
COMMENT_RE = re.compile(r'^\.\.(\s|$)')
PUNCT_LINE_RE = re.compile(r'^[!-/:-@\[-`{-~]{3,}$|^[=\-]+(\s+[=\-]+)+$')
SIMPLE_TABLE_BORDER_RE = re.compile(r'^=+(\s+=+)+$')
BULLET_RE = re.compile(r'^([-*+\u2022]|#\.|\d+\.|[a-z]\.|\(\d+\)|\d+\))\s+')

# Inline markup, matched in one left-to-right pass so that e.g. the contents
# of ``literals`` are never re-interpreted as *emphasis*.
INLINE_RE = re.compile(
    r'``(?P<lit>.+?)``'  # ``literal``
    r'|:(?P<rolename>[\w:.+-]+):`(?P<role>[^`]+)`'  # :role:`target`
    r'|`(?P<ref>[^`]+?)`__?'  # `text <url>`_ / `name`_
    r'|`(?P<interp>[^`]+)`'  # `default role`
    r'|\*\*(?P<strong>[^*\s](?:[^*]*?[^*\s])?)\*\*'  # **strong**
    r'|(?<![\w*])\*(?P<em>[^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])'  # *emphasis*
    r'|\|(?P<subst>[\w.-]+)\|_{0,2}'  # |substitution|
    r'|\s?\[(?:#\w*|\d+|\*)\]_'  # footnote refs [1]_ [#]_
)
LINK_TARGET_RE = re.compile(r'^(.*?)\s*<[^<>]*>$', re.S)
# Roles whose bare target is a number that reads better with a prefix.
NUMBERED_ROLES = {'pep': 'PEP ', 'rfc': 'RFC ', 'issue': 'bpo-', 'gh': 'gh-'}


def _inline(match):
    """Replacement text for one INLINE_RE match."""
    for name in ('lit', 'strong', 'em', 'subst'):
        if match.group(name) is not None:
            return match.group(name)
    for name in ('role', 'ref', 'interp'):
        text = match.group(name)
        if text is None:
            continue
        titled = LINK_TARGET_RE.match(text)
        if titled and titled.group(1):  # `title <target>` -> title
            return titled.group(1)
        if titled:  # `<target>` -> target
            text = text.strip('<>')
        if name == 'role':
            text = text.lstrip('!')
            prefix = NUMBERED_ROLES.get(match.group('rolename'))
            if prefix and text.isdigit():  # :pep:`8` -> PEP 8
                return prefix + text
            if text.startswith('~'):  # :meth:`~a.b.c` -> c
                text = text[1:].rsplit('.', 1)[-1]
            text = text.lstrip('.')  # :func:`.open` -> open
        return text
    return ''  # footnote reference


def simplify_inline(text):
    text = INLINE_RE.sub(_inline, text)
    text = text.replace('\\ ', '')  # RST escaped space (separator)
    text = re.sub(r'\\(.)', r'\1', text)  # other backslash escapes
    return text


def indent_of(line):
    return len(line) - len(line.lstrip(' '))


def prose_lines(lines):
    """First pass: drop code blocks, directives, comments and tables.

    Returns lines where dropped regions are replaced by blank lines, so that
    the remaining text can be split into paragraphs on blank lines.
    """
    out = []
    skip_deeper_than = None  # skip blank lines and lines indented more than this
    skip_to_blank = False  # skip directive arguments/options up to a blank line
    in_table = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = indent_of(line)

        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
            out.append('')
        if skip_to_blank:
            if stripped:
                continue
            skip_to_blank = False
        if in_table:  # simple table: ends at a border followed by a blank
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ''
            if SIMPLE_TABLE_BORDER_RE.match(stripped) and not nxt:
                in_table = False
            continue
        if SIMPLE_TABLE_BORDER_RE.match(stripped):
            in_table = True
            out.append('')
            continue

        directive = DIRECTIVE_RE.match(stripped)
        if directive:
            name, arg = directive.group(1), directive.group(2) or ''
            out.append('')
            if name in SKIP_BODY:
                skip_deeper_than = indent
            elif name in PROSE_DIRECTIVES:
                words = arg.split()[PROSE_DIRECTIVES[name] :]
                if words:  # keep the inline text, aligned with the body
                    nxt = lines[i + 1] if i + 1 < len(lines) else ''
                    body = indent_of(nxt) if nxt.strip() and indent_of(nxt) > indent else indent + 3
                    out.append(' ' * body + ' '.join(words))
            else:  # e.g. .. function:: -- drop signature and options
                skip_to_blank = True
            continue
        if COMMENT_RE.match(stripped):  # comment, link target or substitution
            out.append('')
            skip_deeper_than = indent
            continue

        out.append(line)
        if stripped.endswith('::'):  # a literal (code) block follows
            skip_deeper_than = indent
    return out


def paragraphs(lines):
    """Second pass: group lines into paragraphs.

    A paragraph is a run of non-blank lines at the same indentation; a change
    of indentation (definition list terms, list items) starts a new one.
    """
    para, content_indent = [], None
    for line in lines + ['']:
        stripped = line.strip()
        indent = indent_of(line)
        if para and (not stripped or indent != content_indent):
            yield para
            para = []
        if not stripped:
            continue
        if not para:
            bullet = BULLET_RE.match(stripped)
            content_indent = indent + (bullet.end() if bullet else 0)
        para.append(stripped)


def clean(para):
    """Turn one paragraph (list of stripped lines) into a line of text, or None."""
    for n, ln in enumerate(para):  # doctest: keep only the text before it
        if ln.startswith('>>>'):
            para = para[:n]
            break
    if not para:
        return None
    if any(PUNCT_LINE_RE.match(ln) for ln in para):  # title / table
        return None
    if any(ln.startswith(('+-', '+=', '|')) for ln in para):  # grid table
        return None
    text = ' '.join(para)
    text = BULLET_RE.sub('', text, count=1)
    text = simplify_inline(text)
    if text.endswith('::'):  # "example::" -> "example:"
        text = text[:-2].rstrip()
        if text and not text.endswith(' '):
            text += ':'
    text = re.sub(r'\s+', ' ', text).strip()
    text = re.sub(r'\s+:$', '', text)  # "text ::" -> "text"
    if len(text) < MIN_CHARS or len(text.split()) < MIN_WORDS:
        return None
    chars = text.replace(' ', '')
    if sum(c.isalpha() for c in chars) < MIN_LETTER_RATIO * len(chars):
        return None
    return text


def source_files(src, parts):
    files = []
    for path in src.rglob('*.rst.txt'):
        rel = path.relative_to(src).as_posix()
        top = rel.split('/', 1)[0]
        if top.endswith('.rst.txt'):
            top = top[: -len('.rst.txt')]
        if top in parts:
            files.append((rel, path))
    return [path for rel, path in sorted(files)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('sources', type=Path, help='the Sphinx _sources folder')
    ap.add_argument('output', type=Path, help='where to write corpus.txt')
    ap.add_argument(
        '--parts',
        default=','.join(DEFAULT_PARTS),
        help='comma-separated top-level folders/files to include (default: %(default)s)',
    )
    args = ap.parse_args(argv)

    parts = {p.strip() for p in args.parts.split(',') if p.strip()}
    files = source_files(args.sources, parts)
    if not files:
        sys.exit(f'no *.rst.txt files for {sorted(parts)} under {args.sources}')

    docs = []
    for path in files:
        text = path.read_text(encoding='utf-8')
        lines = [ln.rstrip() for ln in text.expandtabs(8).splitlines()]
        for para in paragraphs(prose_lines(lines)):
            doc = clean(para)
            if doc:
                docs.append(doc)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, 'w', encoding='utf-8', newline='\n') as f:
        f.write('\n'.join(docs) + '\n')
    size = args.output.stat().st_size
    words = sum(len(d.split()) for d in docs)
    print(f'{len(files)} files -> {args.output}: {size} bytes, {len(docs)} lines, {words} words')


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Split the bundled corpus into two sources, for a two-source mixture on shipped data.

Usage:
    python data/text/split_corpus.py [data/text/corpus.txt] [data/text/mixture]

Writes code.txt (paragraphs that mention code: a call such as len(x), a dunder name, None,
True, False or a >>> prompt; about a fifth of the text) and prose.txt (the rest) into the
output folder, one document per line, in corpus order. The split is a fixed rule on each line,
so it is reproducible. The output is generated, not shipped: data/text/mixture/ is git-ignored.
"""

import os
import re
import sys

CODE = re.compile(r'\w\(|>>>|\bNone\b|\bTrue\b|\bFalse\b|__\w+__')


def main(corpus: str = 'data/text/corpus.txt', output: str = 'data/text/mixture') -> None:
    os.makedirs(output, exist_ok=True)
    counts = {'code': 0, 'prose': 0}
    with (
        open(corpus, encoding='utf-8') as f,
        open(os.path.join(output, 'code.txt'), 'w', encoding='utf-8') as code,
        open(os.path.join(output, 'prose.txt'), 'w', encoding='utf-8') as prose,
    ):
        for line in f:
            is_code = bool(CODE.search(line))
            (code if is_code else prose).write(line)
            counts['code' if is_code else 'prose'] += 1
    print(
        f'{counts["code"]:,} documents in {output}/code.txt, '
        f'{counts["prose"]:,} in {output}/prose.txt'
    )


if __name__ == '__main__':
    main(*sys.argv[1:])

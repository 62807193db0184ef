#!/usr/bin/env python3
"""A large corpus for measuring the data pipeline: the bundled corpus repeated, each line prefixed.

Usage:
    python data/text/make_repeated_corpus.py /tmp/corpus_300mb.txt [--copies=50]

Copy r of line L is written as "r L", so every line is a distinct document (its own hash, its own
train/validation side), while the text stays real English. 50 copies of corpus.txt are 300 MB and
77.5 M tokens at vocab 4096. The output is not data to ship: write it outside the repository.
"""

import argparse
import os

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus.txt')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('output', help='file to write')
    parser.add_argument('--copies', type=int, default=50, help='times the corpus is repeated')
    args = parser.parse_args()
    with open(CORPUS, encoding='utf-8') as f:
        lines = f.read().splitlines()
    with open(args.output, 'w', encoding='utf-8') as out:
        for copy in range(args.copies):
            out.write(''.join(f'{copy} {line}\n' for line in lines))
    print(
        f'Wrote {args.output}: {os.path.getsize(args.output):,} bytes, '
        f'{args.copies * len(lines):,} documents'
    )


if __name__ == '__main__':
    main()

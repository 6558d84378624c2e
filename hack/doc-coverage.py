#!/usr/bin/env python3
"""Every public declaration in the given source folders has a doc comment; every public function
or initialiser that takes parameters documents them (`- Parameter`/`- Parameters:`) and every one
that throws says what (`- Throws:`). Exits 1 listing what is missing. Generated code
(`*.pb.swift`) and extensions themselves are exempt."""
import glob
import re
import sys

DECL = re.compile(r'^(@[\w()]+\s+)*(public|open)\s')
CALLABLE = re.compile(r'(func\s+[^\s(<]+|init\??)\s*(<[^>]*>)?\(')


def doc_above(lines, i):
    j = i - 1
    while j >= 0 and lines[j].strip().startswith('@'):
        j -= 1
    doc = []
    while j >= 0 and lines[j].strip().startswith('///'):
        doc.insert(0, lines[j].strip())
        j -= 1
    return '\n'.join(doc)


def signature(lines, i):
    sig, k = lines[i].strip(), i
    while '{' not in sig and k + 1 < len(lines) and k < i + 6:
        k += 1
        sig += ' ' + lines[k].strip()
    return sig.split('{')[0]


def parameters(sig):
    m = CALLABLE.search(sig)
    if not m:
        return None
    k, depth = m.end(), 1
    start = k
    while k < len(sig) and depth > 0:
        depth += {'(': 1, ')': -1}.get(sig[k], 0)
        k += 1
    return sig[start:k - 1].strip()


def main(folders):
    problems, total = [], 0
    for folder in folders:
        for path in sorted(glob.glob(folder + '/**/*.swift', recursive=True)):
            if path.endswith('.pb.swift'):
                continue
            lines = open(path, encoding='utf-8').read().split('\n')
            for i, line in enumerate(lines):
                st = line.strip()
                if not DECL.match(st) or re.match(r'^(public\s+)?extension\b', st):
                    continue
                total += 1
                doc = doc_above(lines, i)
                where = f'{path}:{i + 1}: {st[:90]}'
                if not doc:
                    problems.append(f'{where}: no doc comment')
                    continue
                sig = signature(lines, i)
                params = parameters(sig) if re.search(r'\b(func|init)\b', st.split('=')[0]) else None
                if params and '- Parameter' not in doc:
                    problems.append(f'{where}: parameters not documented')
                if params is not None and re.search(r'\bthrows\b', sig) and '- Throws' not in doc:
                    problems.append(f'{where}: throws not documented')
    for p in problems:
        print(p)
    print(f'doc-coverage: {total} public declarations, {len(problems)} problems')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Check the relative links and #anchors of the markdown docs (GitHub slugs).

Usage: python tools/check_docs.py [ROOT] [EXTRA_FILE ...]   (make lint runs it)
Checks every [text](target) / ![alt](target) outside code in ROOT/README.md, ROOT/docs/*.md
and ROOT/benchmarks/README.md: a relative target must be a file (or directory) under ROOT,
an #anchor must be a heading slug of the target markdown file. EXTRA_FILEs (e.g. the
README-reference list) and the code (comments that link `docs/<page>.md#anchor`) are scanned
for those bare references too.
Exit status 1 on any broken link.
"""
import re
import sys
from pathlib import Path

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
BARE = re.compile(r"((?:docs/[\w.-]+\.md|benchmarks/README\.md|README\.md)(?:#[\w-]+)?)")


def strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)   # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)                         # code spans


def slug(heading: str) -> str:
    h = re.sub(r"<!--.*?-->", "", heading)
    h = re.sub(r"[`*]", "", h).strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)        # keeps letters, digits, _, -, space (unicode-aware)
    return h.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen, out = {}, set()
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def check(root: Path, src: Path, target: str, errors: list) -> None:
    if re.match(r"^[a-z]+:", target) or target.startswith("//"):
        return  # external
    path, _, frag = target.partition("#")
    dest = (src.parent / path).resolve() if path else src.resolve()
    try:
        rel = dest.relative_to(root.resolve())
    except ValueError:
        errors.append(f"{src.relative_to(root)}: {target}: outside the repository")
        return
    if not dest.exists():
        errors.append(f"{src.relative_to(root)}: {target}: no file {rel}")
        return
    if frag:
        if dest.suffix != ".md":
            errors.append(f"{src.relative_to(root)}: {target}: anchor into a non-markdown file")
        elif frag not in anchors(dest):
            errors.append(f"{src.relative_to(root)}: {target}: no heading #{frag} in {rel}")


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]
    errors, n = [], 0
    for f in files:
        for m in LINK.finditer(strip_code(f.read_text())):
            n += 1
            check(root, f, m.group(1), errors)
    # code comments link docs pages by their path from the repository root
    code = [p for d in ("coopseg", "coopseg_kernels", "csrc", "benchmarks", "tools", "tests")
            for p in sorted((root / d).rglob("*")) if p.suffix in (".py", ".cpp", ".h", ".sh")]
    for extra in [*code, *map(Path, sys.argv[2:])]:
        text = re.sub(r"^```.*?^```", "", Path(extra).read_text(), flags=re.S | re.M)
        for m in BARE.finditer(text):
            n += 1
            before = len(errors)
            check(root, root / "README.md", m.group(1), errors)   # paths relative to the repository root
            errors[before:] = [f"{extra}: {e.partition(': ')[2]}" for e in errors[before:]]
    for e in errors:
        print(e)
    print(f"{n} links checked, {len(errors)} broken")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

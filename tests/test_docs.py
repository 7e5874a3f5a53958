"""The documents: README.md stays a front door, every link resolves, every command shown parses,
no document names a path outside the repository, and the README's headline table is
docs/results.md's."""
import json
import re
import shlex
from pathlib import Path

import pytest

import minicca

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_WORDS = 2500
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")


def rel(path):
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(text):
    return [m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0] for m in FENCE.finditer(text)]


def prose(text):
    """The text outside fenced code blocks and inline code: where links live."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def test_readme_is_at_most_2500_words():
    """Words as `len(text.split())` counts them: runs of non-whitespace, so a table's `|` and a code
    block's tokens count too."""
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= MAX_README_WORDS, f"README.md has {words} words, more than {MAX_README_WORDS}"


# Links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation dropped (`.` and `:` too), spaces to
    hyphens; Markdown's inline code and emphasis markers go, their text stays."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_anchor(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def link_targets(path):
    text = prose(path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) + HTML_SRC.findall(text) if not EXTERNAL.match(t)]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relative_link_and_image_resolves(doc):
    broken = []
    for target in link_targets(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no file {file_part}")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(doc)}: " + "; ".join(broken)


def test_the_link_check_can_fail(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# A `b`: c.d\n[x](missing.png) ![y](doc.md) [z](#a-b-cd) [w](#nope) "
                   "[u](https://example.org) `[v](in-code.md)`\n", encoding="utf-8")
    assert link_targets(doc) == ["missing.png", "doc.md", "#a-b-cd", "#nope"]
    assert anchors(doc) == {"a-b-cd"}


# Commands: every `python minicca.py ...` shown is accepted by minicca's parser (parsed, not run)

LAUNCHER = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3?|torchrun)\b")
SHELL_STOP = {"&&", "||", ";", "|", ">", ">>", "<", "2>", "&"}


SHELL_VARIABLE = re.compile(r'^([A-Z][A-Z0-9_]*)="([^"$]*)"$')


def minicca_commands(text):
    """(shown text, argv after minicca.py) for each command that runs minicca.py: in code blocks and
    inline code, with or without leading VAR=value settings, via python or torchrun. A variable
    a code block sets on a line of its own (`B6="--steps 1600"`) is expanded wherever `$B6` is
    used."""
    snippets = [line for block in fenced_blocks(text) for line in block.splitlines()]
    variables = dict(m.groups() for m in map(SHELL_VARIABLE.match, snippets) if m)
    snippets += [" ".join(code.split()) for code in INLINE_CODE.findall(FENCE.sub("", text))]
    commands = []
    for snippet in snippets:
        for part in re.split(r"&&|\|\||;", snippet):
            part = part.strip()
            if "minicca.py" not in part or not LAUNCHER.match(part):
                continue
            expanded = re.sub(r"\$([A-Z][A-Z0-9_]*)", lambda m: variables.get(m[1], m[0]), part)
            words = shlex.split(expanded, comments=True)
            argv = words[words.index("minicca.py") + 1:]
            stop = next((i for i, w in enumerate(argv) if w in SHELL_STOP), len(argv))
            commands.append((part, argv[:stop]))
    return commands


def test_the_command_finder_sees_every_form():
    text = ("Run `python minicca.py --seed\n1` or `OMP_NUM_THREADS=1 python minicca.py --no-eval`.\n"
            "```bash\ntorchrun --standalone --nproc_per_node=2 minicca.py --preset micro  # two\n"
            "mkdir -p x && python minicca.py tokenizer --out x > log\n"
            "python -c 'import minicca'\nB6=\"--steps 1600 --out y\"\n"
            "python minicca.py $B6 --lam 3\npython minicca.py $UNSET\n```\n")
    assert [argv for _, argv in minicca_commands(text)] == [
        ["--preset", "micro"], ["tokenizer", "--out", "x"],
        ["--steps", "1600", "--out", "y", "--lam", "3"], ["$UNSET"], ["--seed", "1"], ["--no-eval"]]


def parse(argv):
    """minicca.parse_args(argv); a parse error raises SystemExit(2); --help prints and exits 0."""
    try:
        return minicca.parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and {"-h", "--help"} & set(argv):
            return None
        raise


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_minicca_command_shown_parses(doc, capsys):
    commands = minicca_commands(doc.read_text(encoding="utf-8"))
    assert commands or doc.name != "README.md", "the README shows no minicca command"
    rejected = []
    for shown, argv in commands:
        try:
            parse(argv)
        except SystemExit:
            rejected.append(f"{shown!r}: {capsys.readouterr().err.strip().splitlines()[-1:]}")
    assert not rejected, f"{rel(doc)}: minicca.parse_args rejects " + "; ".join(rejected)


def test_the_parser_rejects_what_it_should():
    with pytest.raises(SystemExit):
        parse(["--no-such-flag"])
    with pytest.raises(SystemExit):
        parse(["no-such-command"])
    with pytest.raises(SystemExit):
        parse(["bench"])  # the benchmark is tools/bench.py
    assert parse(["tokenizer", "--device", "cpu"]).command == "tokenizer"


# No absolute paths, nor paths that climb out of the repository

BEFORE = r"(?:^|(?<=[\s`'\"(=:\[]))"   # a path starts a word, a quote, a link or a value
PATH_REST = r"[^\s`'\")\]]*"
OUTSIDE = [
    re.compile(BEFORE + r"/(?:work|home|root|tmp|Users|mnt|opt|srv|scratch|data|usr|var|etc|media"
               r"|private|shared)\b" + PATH_REST),          # the usual roots, even alone: "/work"
    re.compile(BEFORE + r"/[A-Za-z_][\w.-]*/[\w.-]+"),        # any absolute path of two parts
    re.compile(BEFORE + r"~/" + PATH_REST),                   # a home folder
    re.compile(BEFORE + r"[A-Za-z]:\\" + PATH_REST),          # a Windows drive
    re.compile(r"[^\s`'\"(]*shared/data" + PATH_REST),       # the project's data folder, any form
]
CLIMB = re.compile(BEFORE + r"(?:\.\./)+" + PATH_REST)       # resolved: must stay in the repository


def documents():
    """Every .md file of the repository and the markdown cells of the notebooks."""
    paths = [p for p in sorted(ROOT.rglob("*.md")) if not {".git", "runs", "data"} & set(
        p.relative_to(ROOT).parts[:-1])]
    docs = [(rel(p), p.parent, p.read_text(encoding="utf-8")) for p in paths]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        markdown = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        docs.append((rel(nb), nb.parent, markdown))
    return docs


def outside_paths(text, folder):
    found = [m.group(0) for pattern in OUTSIDE for m in pattern.finditer(text)]
    found += [m.group(0) for m in CLIMB.finditer(text)
              if ROOT not in (folder / m.group(0)).resolve().parents]
    return sorted(set(found))


@pytest.mark.parametrize("name, folder, text", documents(), ids=[d[0] for d in documents()])
def test_no_document_names_a_path_outside_the_repository(name, folder, text):
    found = outside_paths(text, folder)
    assert not found, f"{name} names paths outside the repository: {found}"


@pytest.mark.parametrize("text", [
    "made from /work/x.npz", "on /work", "`../shared/data/c.npz`", "(/home/u/a)", "and /tmp/run",
    "out=/scratch/x", "/opt/x/y", "under ~/data", "C:\\Users\\me", "see ../../elsewhere.md",
    "[a](../../x.md)", "shared/data/cifar10", "/root"])
def test_the_path_check_finds(text):
    assert outside_paths(text, ROOT / "docs"), text


@pytest.mark.parametrize("text", [
    "https://example.org/a/b", "12,000 / 2,000", "tiny_data/judge.pt", "[a](../README.md)",
    "`runs/tiny/`", "~2.7x", "w/o", "λ/K = 1/10", "data/cifar10_gpu_check.npz", "and/or"])
def test_the_path_check_passes(text):
    assert not outside_paths(text, ROOT / "docs"), text


# The README's headline table is the default run's table in docs/results.md, not a second copy

def first_table(text, heading):
    """The first Markdown table under a heading: {first cell: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_the_readme_headline_table_is_the_default_run_in_results():
    headline = first_table(README.read_text(encoding="utf-8"), "What you get")
    default_run = first_table(RESULTS.read_text(encoding="utf-8"), "The default run")
    assert len(headline) >= 4
    for setting, cells in headline.items():
        assert setting in default_run, f"README row {setting!r} is not in docs/results.md"
        for column, cell in cells.items():
            assert "±" in cell, f"README {setting!r} {column}: {cell!r} has no error bar"
            assert default_run[setting][column] == cell, (setting, column)

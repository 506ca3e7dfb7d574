"""The docs a newcomer reads, checked against the tree: README.md, CONTRIBUTING.md and docs/*.md.

(a) every relative link resolves to a file of the repository, and its #anchor (if any) to a heading of that page;
(b) every `python -m reid_ray...` (or `python -m tests...`) and `reid-ray ...` command in them, in a shell code block
    or in inline code, parses with the current flags: the entry point's own `main` is called, with its real argparse
    parser, and stopped right after that parser has read the arguments (nothing runs: no Ray, no files);
(c) none of them points outside the repository by a relative path (`../`), in a link or anywhere else.

A command in a code block must parse as written; inline code may name a command without its required flags
(`reid-ray export`, `reid-ray embed ... --out feats/`), and is checked for its flags and their values only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console", "zsh"}  # the code blocks whose commands are checked
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
OPERATORS = {"&&", "||", "|", ";"}
PYTHON = re.compile(r"(?:.*/)?python(?:3(?:\.\d+)?)?")
PACKAGE_MAINS = {"reid_ray": "reid_ray.cli"}  # `python -m reid_ray` runs reid_ray/__main__.py: the reid-ray script


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- reading Markdown

def split_page(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the prose, its fenced code blocks blanked out line for line; [(language, code), ...])."""
    prose, blocks, fence, lang, code = [], [], None, "", []
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, code = m.group(1), m.group(2).lower(), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((lang, "\n".join(code)))
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def inline_code(prose: str) -> list[str]:
    return [" ".join(m.group(2).split()) for m in INLINE.finditer(prose)]


def without_inline_code(prose: str) -> str:
    return INLINE.sub("code", prose)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ...), and its explicit <a id=...>."""
    prose, _ = split_page(text)
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", prose))
    return out


def links(text: str) -> list[str]:
    prose = without_inline_code(split_page(text)[0])
    return LINK.findall(prose) + REFERENCE.findall(prose)


def inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


# --------------------------------------------------------------------------- (a) and (c): links

def broken_links(page: Path, text: str | None = None) -> list[str]:
    """What is wrong with the relative links of `page` (its text, or `text` as if it were the page's)."""
    text = page.read_text() if text is None else text
    problems = []
    for target in links(text):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto: not this test's
        where, _, anchor = target.partition("#")
        if where.startswith("/"):
            problems.append(f"{target}: an absolute path; link relative to {page_id(page)}")
            continue
        resolved = (page.parent / where).resolve() if where else page
        if not inside(resolved):
            problems.append(f"{target}: outside the repository")
        elif where and not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(text if not where else resolved.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {page_id(resolved)}")
    return problems


def escapes(page: Path, text: str | None = None) -> list[str]:
    """Every relative path with `../` in the page (links, code, prose) that leads out of the repository."""
    text = page.read_text() if text is None else text
    return [m.group(0) for m in re.finditer(r"(?<![\w.])(?:\.\./)+[^\s)\]`'\"<>]*", text)
            if not inside((page.parent / m.group(0)).resolve())]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    assert page.is_file()
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_nothing_points_outside_the_repository(page):
    assert escapes(page) == [], f"{page_id(page)} points outside the repository"


def test_the_link_checks_can_fail():
    page = ROOT / "docs" / "page.md"  # never written: its text is given
    text = ("[ok](../README.md) [anchor](#a-heading) [gone](missing.md) [bad anchor](../README.md#no-such-heading)\n"
            "[out](../../elsewhere/x.md) [abs](/etc/passwd) [web](https://docs.ray.io) [self](#nowhere)\n\n"
            "## A heading\n\n```bash\n[in code](not-a-link.md)\ncat ../../../shared/notes.md\n```\n")
    problems = broken_links(page, text)
    assert [p.split(": ")[0] for p in problems] == ["missing.md", "../README.md#no-such-heading",
                                                    "../../elsewhere/x.md", "/etc/passwd", "#nowhere"], problems
    assert escapes(page, text) == ["../../elsewhere/x.md", "../../../shared/notes.md"]
    assert escapes(ROOT / "README.md", "see [it](docs/x.md) and `../shared/y`") == ["../shared/y"]
    assert slug("GPU figures on an NVIDIA H200 (`bench/gpu.py`, issue 16)") == "gpu-figures-on-an-nvidia-h200-benchgpupy-issue-16"
    assert slug("SAN ablation (synth-a → synth-b)") == "san-ablation-synth-a--synth-b"
    assert {"a", "a-1"} <= anchors("## A\n\n## A\n")


# --------------------------------------------------------------------------- (b): commands

class CommandError(Exception):
    """A documented command that its entry point's parser refuses."""


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _prepare(parser: argparse.ArgumentParser, relaxed: bool) -> None:
    """No abbreviated flags (the docs spell them in full); with `relaxed`, no required arguments either."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if relaxed:
                action.required = False
            for sub in set(action.choices.values()):
                _prepare(sub, relaxed)
        elif relaxed:
            action.required = False
            if not action.option_strings and action.nargs is None:
                action.nargs = "?"


def entry_point(entry: str):
    """The function a documented command runs: `reid-ray` is reid_ray.cli.main; `python -m M` is M's `main`."""
    if entry == "reid-ray":
        module = "reid_ray.cli"
    else:
        module = entry.split()[-1]
        module = PACKAGE_MAINS.get(module, module)
    try:
        main = getattr(importlib.import_module(module), "main", None)
    except ImportError as e:
        raise CommandError(f"{entry}: no such module ({e})") from None
    if main is None:
        raise CommandError(f"{entry}: {module} has no main(argv) to parse with")
    return main


def parse(entry: str, args: list[str], relaxed: bool = False) -> argparse.Namespace | None:
    """The namespace the entry point's own parser makes of `args` (None after --help or --version), or
    CommandError with argparse's message. The entry point runs only up to its parse_args."""
    main = entry_point(entry)
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        _prepare(self, relaxed)
        raise _Parsed(original(self, args, namespace))

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            if e.code in (0, None):
                return None  # --help, --version
            raise CommandError(f"{entry} {shlex.join(args)}: {err.getvalue().strip()}") from None
    raise CommandError(f"{entry} {shlex.join(args)}: returned without parsing its arguments")


def commands(code: str) -> list[tuple[str, list[str]]]:
    """The reid-ray commands in one logical line of shell: [(entry, args)], entry `reid-ray` or `python -m M`.
    `<placeholder>` and `$VAR` become plain words, comments go, `...` stands for flags left out."""
    code = re.sub(r"<[^<>\n]*>", "PLACEHOLDER", code)
    code = re.sub(r"\$\{?[A-Za-z_]\w*\}?", "VALUE", code)
    found, segment = [], []
    for token in [*shlex.split(code, comments=True), ";"]:
        if token not in OPERATORS:
            segment.append(token)
            continue
        for i, word in enumerate(segment):
            if PYTHON.fullmatch(word) and segment[i + 1:i + 2] == ["-m"] and len(segment) > i + 2:
                module = segment[i + 2]  # `python -m reid_ray...` or `-m reid_ray.PLACEHOLDER` is a mention
                if re.fullmatch(r"(reid_ray|tests)(\.\w+)*", module) and "PLACEHOLDER" not in module:
                    found.append((f"python -m {module}", segment[i + 3:]))
                break
            if word == "reid-ray" and (i == 0 or segment[i - 1] == "--"
                                       or all(re.fullmatch(r"\w+=\S*", w) for w in segment[:i])):
                found.append(("reid-ray", segment[i + 1:]))
                break
        segment = []
    return [(entry, [a for a in args if a not in ("...", "…")]) for entry, args in found]


def shell_lines(code: str) -> list[str]:
    """The logical lines of a shell block: `\\` continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def documented_commands(page: Path) -> list[tuple[str, list[str], bool, str]]:
    """[(entry, args, relaxed, as written)] of every command on the page."""
    prose, blocks = split_page(page.read_text())
    out = []
    for lang, code in blocks:
        if lang in SHELL:
            for line in shell_lines(code):
                out += [(e, a, "..." in line or "…" in line, line.strip()) for e, a in commands(line)]
    for span in inline_code(prose):  # a span that starts with a command, or hands one to `ray job submit --`
        if re.match(r"(\w+=\S*\s+)*(reid-ray(\s|$)|\S*python[\d.]*\s+-m\s)", span) or re.search(r"\s--\s", span):
            out += [(e, a, True, span) for e, a in commands(span)]
    return out


def check_command(text: str, relaxed: bool = False) -> list[argparse.Namespace | None]:
    found = commands(text)
    if not found:
        raise CommandError(f"{text}: no reid-ray command in it")
    return [parse(entry, args, relaxed) for entry, args in found]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_documented_command_parses(page):
    found = documented_commands(page)
    refused = []
    for entry, args, relaxed, written in found:
        try:
            parse(entry, args, relaxed)
        except CommandError as e:
            refused.append(f"{written!r}: {e}")
    assert refused == [], "\n".join(refused)


def test_the_readme_shows_the_two_entry_points():
    entries = {entry for entry, *_ in documented_commands(ROOT / "README.md")}
    assert {"python -m reid_ray.train", "python -m reid_ray.tune", "reid-ray"} <= entries, entries


def test_a_command_is_read_as_the_shell_reads_it():
    assert commands("RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m reid_ray.tune --method mmt  # a sweep") \
        == [("python -m reid_ray.tune", ["--method", "mmt"])]
    assert commands("python -m reid_ray.train --init outputs/<baseline seed 1>/c.pt --output $OUT/x") \
        == [("python -m reid_ray.train", ["--init", "outputs/PLACEHOLDER/c.pt", "--output", "VALUE/x"])]
    assert commands("git clone x && cd reid-ray && reid-ray synth data/") == [("reid-ray", ["synth", "data/"])]
    assert commands(".venv/bin/python -m reid_ray.cli.demo | tee log") == [("python -m reid_ray.cli.demo", [])]
    assert commands("mlflow ui --backend-store-uri sqlite:///mlflow.db") == []
    assert commands("python -m reid_ray... or python -m reid_ray.<module>") == []
    assert shell_lines("python -m reid_ray.train \\\n    --epochs 3") == ["python -m reid_ray.train      --epochs 3"]
    namespace = check_command("python -m reid_ray.train --method mmt --epochs 3 --set lr=1e-4 --set model.arch=small")[0]
    assert (namespace.method, namespace.epochs, namespace.overrides) == ("mmt", 3, ["lr=1e-4", "model.arch=small"])
    assert check_command("reid-ray --version") == [None]


@pytest.mark.parametrize("command", [
    "python -m reid_ray.train --method mmt --no-such-flag",
    "python -m reid_ray.train --num-samples 3",                 # a flag of tune, not of train
    "python -m reid_ray.tune --epochs many",                    # a value of the wrong type
    "python -m reid_ray.tune --scheduler hyperband",            # not one of the choices
    "reid-ray tune --workers 2",                                # an abbreviation of --workers-per-trial
    "reid-ray trian --method mmt",                              # no such command
    "reid-ray san-pg predict --checkpoint c.pt --dataset synth-b",   # --data-root is required
    "python -m reid_ray.mlflow_ui --out docs/mlflow-ui.png",    # moved: python -m tests.mlflow_ui
    "python -m reid_ray.demo",                                  # gone: python -m reid_ray.cli.demo
])
def test_a_wrong_command_is_refused(command):
    with pytest.raises(CommandError):
        check_command(command)


def test_inline_code_is_checked_for_its_flags_only():
    assert check_command("reid-ray export", relaxed=True)[0] is not None
    with pytest.raises(CommandError):
        check_command("reid-ray export")  # as a full command: --checkpoint and --onnx are required
    with pytest.raises(CommandError):
        check_command("reid-ray embed --outt feats/", relaxed=True)


# --------------------------------------------------------------------------- make targets

def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = set()
    for page in PAGES:
        prose, blocks = split_page(page.read_text())
        lines = [line for lang, code in blocks if lang in SHELL for line in shell_lines(code)]
        for text in lines + inline_code(prose):
            named.update(re.findall(r"(?:^|&&\s*|;\s*)make\s+([\w.-]+)", text.strip()))
    assert {"demo", "test"} <= named and named <= targets, named - targets

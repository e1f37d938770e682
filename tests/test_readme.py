"""The README is a product page: at most 150 lines, and every `edge` command in its ```bash blocks parses with
the CLI as it is (the subcommand exists, every option is one of that subcommand's, the values convert, nothing
required is missing). In process, at parse level: Click's make_context, never the command itself (no export).
The docs' ```bash blocks, where the README's longer passages moved, are held to the same."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 150
SEPARATORS = {"&&", "||", ";", "|", "&"}


def bash_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of every line inside a ```bash block, continuation lines joined."""
    out, inside, pending, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if not inside:
            inside = bool(re.fullmatch(r"```(bash|sh|shell|console)", fence))
            continue
        if fence.startswith("```"):
            inside = False
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def edge_invocations(line: str) -> list[list[str]]:
    """The argument lists of the `edge` calls on one shell line: `edge ...`, `<dir>/edge ...` (.venv/bin/edge,
    ~/edge/bin/edge), `python -m edge ...`; comments dropped, `&&` / `;` / `|` chains split."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    calls = []
    for seg in segments:
        if not seg:
            continue
        prog = seg[0]
        if prog == "edge" or prog.endswith("/edge"):
            calls.append(seg[1:])
        elif re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", prog) and seg[1:3] == ["-m", "edge"]:
            calls.append(seg[3:])
    return calls


def commands_in(path: Path) -> list[tuple[str, list[str]]]:
    return [
        (f"{path.relative_to(ROOT)}:{n}", args)
        for n, line in bash_lines(path.read_text(encoding="utf-8"))
        for args in edge_invocations(line)
    ]


def parse_error(args: list[str]) -> str | None:
    """None when `edge ARGS` parses; else what is wrong. Walks the Click tree Typer builds (typer 0.29 vendors
    Click as typer._click: a group is a command with list_commands) and parses the leaf with make_context."""
    import typer.main
    from typer._click import Context
    from typer._click.exceptions import UsageError

    from edge.cli import app

    cmd = typer.main.get_command(app)
    ctx = Context(cmd, info_name="edge")
    rest = list(args)
    while hasattr(cmd, "list_commands"):
        if not rest or rest[0].startswith("-"):
            return f"`{ctx.command_path}` needs a subcommand first: one of {', '.join(cmd.list_commands(ctx))}"
        name, rest = rest[0], rest[1:]
        sub = cmd.get_command(ctx, name)
        if sub is None:
            return f"`{ctx.command_path}` has no subcommand {name!r}: one of {', '.join(cmd.list_commands(ctx))}"
        cmd, ctx = sub, Context(sub, info_name=name, parent=ctx)
    # Every option named must be one of this command's (`--opt=value` too), before the full parse.
    known = {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for token in rest:
        if token == "--":
            break
        if token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-\d.*", token):
            if token.split("=", 1)[0] not in known:
                return f"`{ctx.command_path}` has no option {token.split('=', 1)[0]}: it has {', '.join(sorted(known))}"
    try:
        cmd.make_context(ctx.info_name, rest, parent=ctx.parent)
    except UsageError as e:
        return f"`{ctx.command_path} {shlex.join(rest)}`: {e.format_message()}"
    return None


def test_readme_is_at_most_150_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines, over {MAX_LINES}: move details into docs/ and link them"


def test_readme_commands_parse_with_the_cli():
    calls = commands_in(README)
    used = {args[0] for _, args in calls if args}
    # The quick start runs the whole chain; a README whose blocks lost their commands would pass vacuously.
    assert {"export", "validate", "generate", "bench"} <= used, f"README's ```bash blocks call only {sorted(used)}"
    errors = [f"{where}: {err}" for where, args in calls if (err := parse_error(args))]
    assert not errors, "README commands the CLI rejects:\n" + "\n".join(errors)


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").rglob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_commands_parse_with_the_cli(doc):
    errors = [f"{where}: {err}" for where, args in commands_in(doc) if (err := parse_error(args))]
    assert not errors, f"{doc.name} commands the CLI rejects:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (".venv/bin/edge export --variant 270m --target android", None),
        ("python -m edge validate exports/b --json  # a comment --bogus", None),
        ("scp pi:pi.npz . && ~/edge/bin/edge validate b --device-logits pi.npz", None),
        ("edge cache ls --json", None),
        (".venv/bin/edge export --variant 270m --bogus", "no option --bogus"),
        ("edge exprot --variant 270m", "no subcommand 'exprot'"),
        ("edge cache prune", "no subcommand 'prune'"),
        ("edge validate b --threads two", "Invalid value"),
        ("edge generate --variant 270m", "Missing option"),
        ("edge bench b --gen-len=8 --jsn", "no option --jsn"),
    ],
)
def test_the_check_tells_good_from_bad(line, error):
    (args,) = edge_invocations(line)
    got = parse_error(args)
    assert (got is None) if error is None else (got is not None and error in got), got

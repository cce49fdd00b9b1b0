"""mkdocs hook: the configuration reference, generated from conf/ at every build so it cannot drift.

`configuration.md` holds the marker below; this hook replaces it with one section per config group
(every option file, every key with its default and the comment next to it in the YAML).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

MARKER = "<!-- conf-reference -->"
KEY_LINE = re.compile(r"^(\s*)([^\s#:'\"-][^:#]*|\"[^\"]*\"):(\s|$)")
INLINE_COMMENT = re.compile(r"\s#\s?(.*)$")


def read_option(path: Path) -> tuple[str, dict, dict[str, str], str | None]:
    """(description, values, comment per dotted key, @package) of one YAML file of conf/."""
    lines = path.read_text().splitlines()
    package, header, comments, pending, stack = None, [], {}, [], []
    in_header = True
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# @package"):
            package = stripped.split()[-1]
            continue
        if stripped.startswith("#"):
            text = stripped[1:]
            if in_header:
                header.append(text[1:] if text.startswith(" ") else text)  # keeps a command's indent
            else:
                pending.append(text.strip())
            continue
        if not stripped:
            pending = []
            continue
        in_header = False
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2).strip().strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        inline = INLINE_COMMENT.search(line[match.end() :])
        text = " ".join(pending + ([inline.group(1)] if inline else []))
        if text:
            comments[".".join(k for _, k in stack)] = text
        pending = []
    values = yaml.safe_load(path.read_text()) or {}
    return describe(header), values, comments, package


def escape(text: str) -> str:
    """Prose from a YAML comment as Markdown: `<run dir>` is text, not an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def describe(header: list[str]) -> str:
    """A file's leading comment as Markdown: prose joined, indented lines (commands) as a code block."""
    prose = " ".join(escape(line) for line in header if not line.startswith(" "))
    commands = [line.strip() for line in header if line.startswith(" ")]
    return prose + ("\n\n```bash\n" + "\n".join(commands) + "\n```" if commands else "")


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    rows: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.update(flatten(value, name + "."))
        else:
            rows[name] = value
    return rows


def show(value: object) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        text = text.removesuffix("...").strip()
    return "`" + text.replace("|", "\\|") + "`" if text else "`''`"


def choices(defaults: list) -> str:
    """The `group=option` choices of a defaults list (what a recipe or a sweep picks)."""
    picked = []
    for entry in defaults:
        if isinstance(entry, dict):
            for key, option in entry.items():
                name = key.removeprefix("override ").lstrip("/")
                picked.append(f"`{name}={'null' if option is None else option}`")
    return ", ".join(picked)


def table(path: Path, prefix: str, group: str | None = None) -> list[str]:
    description, values, comments, package = read_option(path)
    lines = [description, ""] if description else []
    defaults = values.pop("defaults", None) if isinstance(values, dict) else None
    if defaults:
        # a plain name in an option's defaults is another option of its group, which this one extends
        extends = [f"`{group}={entry}`" for entry in defaults if isinstance(entry, str) and entry != "_self_"]
        lines += [f"Extends {', '.join(extends)}; the keys below change it.", ""] if extends else []
        lines += [f"Picks: {choices(defaults)}", ""] if choices(defaults) else []
    rows = flatten(values) if isinstance(values, dict) else {}
    if package == "_global_":
        prefix = ""
    if rows:
        lines += ["| key | default | notes |", "|---|---|---|"]
        shown: set[str] = set()
        for key, value in rows.items():
            # a comment above a mapping (`run:` with `dir:` below it) goes with its first key
            parents = [".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 2)]
            notes = [comments[p] for p in parents if p in comments and p not in shown]
            shown.update(parents)
            note = escape(" ".join(notes)).replace("|", "\\|")
            lines.append(f"| `{prefix}{key}` | {show(value)} | {note} |")
        lines.append("")
    return lines


def group_defaults(conf: Path) -> dict[str, str | None]:
    """group -> default option, from conf/train.yaml's defaults list."""
    picked: dict[str, str | None] = {}
    for entry in yaml.safe_load((conf / "train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            for group, option in entry.items():
                picked[group.removeprefix("override ")] = option
    return picked


def groups(conf: Path) -> list[Path]:
    return sorted(p for p in conf.iterdir() if p.is_dir())


def reference(conf: Path) -> str:
    """Markdown for every top-level config and every group of `conf`."""
    defaults = group_defaults(conf)
    out: list[str] = []
    for top in ("train", "eval"):
        out += [f"## `conf/{top}.yaml` (`python {top}.py`)", ""]
        out += table(conf / f"{top}.yaml", "")
    for group in groups(conf):
        options = sorted(p.stem for p in group.glob("*.yaml"))
        default = defaults.get(group.name)
        out += [f"## `{group.name}`", ""]
        picked = f"default `{default}`" if default else "none by default"
        out += [f"`{group.name}=<option>`, one of {', '.join(f'`{o}`' for o in options)}; {picked}.", ""]
        for option in options:
            out += [f"### `{group.name}={option}`", ""]
            out += table(group / f"{option}.yaml", f"{group.name}.", group.name)
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    conf = Path(config["config_file_path"]).parent / "conf"
    return markdown.replace(MARKER, reference(conf))

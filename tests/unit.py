"""The systemd unit and its defaults file, read the way systemd reads them,
and the daemon's options as ``twistd pistream --help`` lists them.

Used by tests/test_debian.py (the files in debian/) and
tests/test_deb_package.py (the installed copies).
"""

import re
import shlex

DEFAULTS_VARIABLE = "PISTREAM_OPTS"


def parse_unit(text):
    """{section: {key: [values]}} of a unit file (continuation lines joined)."""
    sections = {}
    current = None
    text = re.sub(r"\\\n", " ", text)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise ValueError(f"unit line {number} is not KEY=VALUE in a section: {line!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_environment_file(text):
    """The variables an EnvironmentFile= sets: KEY=VALUE lines, # or ; comments,
    values optionally in single or double quotes."""
    env = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"environment file line {number} is not KEY=VALUE: {line!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = re.sub(r'\\(["\\$`])', r"\1", value)
        elif value[:1] in ("'", '"') or value.endswith("\\"):
            raise ValueError(f"environment file line {number}: unsupported quoting {line!r}")
        env[key] = value
    return env


def expand_command(command, env):
    """An Exec*= command line as systemd runs it: a word that is exactly $NAME
    becomes the variable's value split on whitespace (no words when empty),
    ${NAME} becomes one word."""
    words = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            words.extend(env.get(whole.group(1), "").split())
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                            lambda m: env.get(m.group(1), ""), word))
    return words


def environment_files(service):
    """[(path, optional)] of a [Service] section's EnvironmentFile= lines."""
    return [(value.lstrip("-"), value.startswith("-"))
            for value in service.get("EnvironmentFile", [])]


_HELP_OPTION = re.compile(r"^(?:  -(\w), |      )--([\w-]+)(=?)")
_HELP_DEFAULT = re.compile(r"\[default: (.*?)\]", re.S)


def options_from_help(help_text):
    """{long name: default} for every option of ``twistd pistream --help``, but
    --help and --version; a flag's default is None, and that of an option
    whose value has no default (such as --annotate) is ""."""
    options = {}
    entries = []
    for line in help_text.splitlines():
        match = _HELP_OPTION.match(line)
        if match:
            entries.append([match.group(2), bool(match.group(3)), line])
        elif entries and line.startswith(" " * 10):
            entries[-1][2] += " " + line.strip()
    for name, takes_value, description in entries:
        if name in ("help", "version"):
            continue
        default = None
        if takes_value:
            found = _HELP_DEFAULT.search(description)
            default = " ".join(found.group(1).split()) if found else ""
        options[name] = default
    return options


def options_missing_from_defaults(options, defaults_text):
    """The options of C{options} (from options_from_help) that the defaults
    file does not show, with their default, in a comment line such as
    ``#   -r, --resolution=640x480``, ``#   --annotate=`` or ``#   --vflip``."""
    shown = set()
    for line in defaults_text.splitlines():
        match = re.match(r"^#\s+(?:-\w, )?--([\w-]+)(?:=(\S*))?\s*$", line)
        if match:
            shown.add((match.group(1), match.group(2)))
    return [f"--{name}" + (f"={default}" if default is not None else "")
            for name, default in options.items() if (name, default) not in shown]

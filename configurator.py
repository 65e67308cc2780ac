"""
The config mechanism every script shares, and the one error class. You can skip this file: it turns
`--key=value` arguments into typed dataclass fields, and nothing in it is about STEM.

    python train.py presets/shakespeare.py --seed=2 --ffn=swiglu   # a preset file first, then overrides
    python train.py --help                                         # every key, its default and its comment

- A script's settings are dataclasses whose defaults carry a comment saying what the key means;
  `--help` prints those comments, so the docs cannot drift from the code.
- `--key=value`, `--key value` and a bare `--flag` (booleans) are type-checked against the field,
  work for None defaults (`Optional[int]`), and an unknown key is refused with the list of valid ones.
  A `list` field is repeatable (`--input a.txt --input b.txt`).
- A preset is a .py file of plain assignments (`n_layer = 6`), read with ast.literal_eval, never run.
- UserError means "bad input": a script's entry point prints it as one `error: ...` line and exits 1.
- It imports no torch, so prepare_data.py starts fast. (nanoGPT calls its version configurator.py too.)
"""

import ast
import dataclasses
import inspect
import math
import os
import sys
import typing


class UserError(Exception):
    """Bad input, or a state the user can fix: one `error: ...` line, exit code 1, no traceback."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def require(ok, msg):  # a value check: one clear line when it fails
    if not ok:
        raise UserError(msg)


def _coerce(key, value, typ, from_cli):
    """A command-line string converted to a field's type (or a preset literal checked against it)."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if value is None or (from_cli and value == "None"):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if from_cli:
        try:
            if typ is bool:
                return {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            value = typ(value) if typ in (int, float) else value
        except (KeyError, ValueError):
            raise UserError(f"--{key}={value} is not a valid {typ.__name__}") from None
    if typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:
        raise UserError(f"{key} = {value!r} is not a {typ.__name__}")
    if typ is float and not math.isfinite(value):  # nan and inf pass every comparison check: refuse them here
        raise UserError(f"{key}={value} is not a finite number")
    return value


def config_help(*configs):
    """Every key with its type, default and the comment beside it in the dataclass source."""
    lines = []
    for c in configs:
        comments = {}
        for line in inspect.getsource(type(c)).splitlines():
            name, _, rest = line.strip().partition(":")
            if rest and "#" in rest and name.isidentifier():
                comments[name] = rest.split("#", 1)[1].strip()
        lines.append(f"{type(c).__name__}:")
        for f in dataclasses.fields(c):
            typ = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
            key = f"  --{f.name}={getattr(c, f.name)!r}".ljust(34)
            lines.append(f"{key} ({typ}) {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def read_preset(path):
    """[(key, value)] from a preset file: plain assignments of literals, never executed."""
    hint = "a preset is a .py file of plain assignments such as presets/shakespeare.py; options are written --key=value"
    if not os.path.isfile(path):
        raise UserError(f"preset file {path} not found ({hint})")
    if not path.endswith(".py"):
        raise UserError(f"{path} is not a preset: {hint}")
    try:
        body = ast.parse(open(path).read()).body
    except (SyntaxError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a preset (a .py file of plain assignments): {type(e).__name__}") from None
    items = []
    for node in body:
        try:
            assert isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            items.append((node.targets[0].id, ast.literal_eval(node.value)))
        except (AssertionError, ValueError):
            raise UserError(f"{path}:{node.lineno}: a preset may only hold assignments of literals, "
                            f"such as n_layer = 6") from None
    return items


def parse_config(argv, *configs, doc=None):
    """Apply an optional preset file (first argument), then --key=value / --key value / --flag arguments,
    to the dataclass instances in place; returns the keys set. -h / --help prints doc and the keys, exits 0."""
    if "-h" in argv or "--help" in argv:
        print((doc.strip() + "\n\n" if doc else "")
              + "Options (--key=value; a preset file of key = value lines may come first):")
        print(config_help(*configs))
        sys.exit(0)
    fields = {f.name: (c, f) for c in configs for f in dataclasses.fields(c)}
    args = list(argv)
    items = [(k, v, False) for k, v in read_preset(args.pop(0))] if args and not args[0].startswith("--") else []
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}: use --key=value")
        key, eq, value = a[2:].partition("=")
        if key in fields and not eq:  # --key value, or a bare --flag for booleans
            has_value = bool(args) and not args[0].startswith("--")
            if not has_value and fields[key][1].type is not bool:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            value = args.pop(0) if has_value else "True"
        items.append((key, value, True))
    for key, value, from_cli in items:
        if key not in fields:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        obj, f = fields[key]
        if f.type is list:  # repeatable: --key a --key b, or in a preset key = "a" or key = ["a", "b"]
            values = value if isinstance(value, (list, tuple)) and not from_cli else [value]
            if not all(isinstance(v, str) for v in values):
                raise UserError(f"{key} = {value!r} is not a string or a list of strings")
            getattr(obj, key).extend(values)
        else:
            setattr(obj, key, _coerce(key, value, f.type, from_cli))
    return {key for key, _, _ in items}


def print_config(*configs):
    for c in configs:
        print(f"{type(c).__name__}:", *(f"  {k} = {v!r}" for k, v in dataclasses.asdict(c).items()), sep="\n")

"""The front door of a study file: YAML read as plain data, with every line remembered for the
error messages, and what a study file has no use for refused before anything is built (anchors
and aliases, deep nesting, huge files, control characters). ``StudyError`` is the one error type
of a bad study (``harness.declare.study`` validates what this returns). Pure Python: pyyaml only.
"""
from __future__ import annotations

import yaml

from harness.declare import config as C

MAX_BYTES = 1 << 20  # a study file is a few KB; 1 MB leaves room and stops a runaway file
MAX_DEPTH = 32  # a study nests about 5 levels
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where available: faster


class StudyError(C.ConfigError):
    """An invalid study file. ``str(e)`` is ``"<file>:<line>: <yaml.path>: <problem>; <fix>"``."""

    def __init__(self, problem: str, *, source: str = "<string>", line: int | None = None,
                 path: str = "", fix: str | None = None):
        where = source + (f":{line}" if line else "")
        path, problem, fix = C.cut(path, 120), C.cut(problem, 300), fix and C.cut(fix, 400)
        text = f"{where}: " + (f"{path}: " if path else "") + problem + (f"; {fix}" if fix else "")
        ValueError.__init__(self, text)
        self.path, self.source, self.line, self.problem, self.fix = path, source, line, problem, fix


def _prescan(text: str, source: str):
    """Refuse what a study file has no use for before anything is composed: anchors and
    aliases (an alias bomb expands exponentially), nesting deeper than ``MAX_DEPTH`` (the
    composer recurses), more than ``MAX_BYTES``. The scanner is linear and builds nothing."""
    if len(text) > MAX_BYTES:
        raise StudyError(f"the file is {len(text):,} characters, more than a study file "
                         f"needs ({MAX_BYTES:,})", source=source,
                         fix="check that this is the study YAML; a study is a few dozen lines")
    _flow_depth_check(text, source)
    depth = 0
    for token in yaml.scan(text, Loader=_LOADER):
        if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
            kind = "anchor" if isinstance(token, yaml.AnchorToken) else "alias"
            raise StudyError(f"YAML {kind} {C.cut(token.value, 40)!r}: anchors and aliases "
                             f"are not allowed in study files", source=source,
                             line=token.start_mark.line + 1,
                             fix="write the values out; a grid axis lists several values")
        if isinstance(token, (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
                              yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)):
            depth += 1
            if depth > MAX_DEPTH:
                raise StudyError(f"nesting deeper than {MAX_DEPTH} levels",
                                 source=source, line=token.start_mark.line + 1,
                                 fix="a study file needs a few levels; check the brackets")
        elif isinstance(token, (yaml.BlockEndToken, yaml.FlowMappingEndToken,
                                yaml.FlowSequenceEndToken)):
            depth -= 1

def _flow_depth_check(text: str, source: str):
    """Count unquoted ``[``/``{`` nesting on the raw text, before the YAML scanner sees it: the
    scanner reads flow collections ahead of the tokens it hands out (and newer PyYAML stops at a
    depth of its own), so only a count of our own reports the limit in the harness's words."""
    depth, quote, line = 0, "", 1
    prev = last = "\n"  # the previous character; the last non-blank one on this line
    for ch in text:
        if ch == "\n":
            line += 1
            if quote == "#":
                quote = ""
        elif quote == "#":
            pass
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"" and last in "\n:-[{,?":  # a quote opens a scalar only where one starts
            quote = ch
        elif ch == "#" and prev in " \t\n":
            quote = "#"
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise StudyError(f"nesting deeper than {MAX_DEPTH} levels", source=source,
                                 line=line, fix="a study file needs a few levels; check the "
                                                "brackets")
        elif ch in "]}":
            depth = max(depth - 1, 0)
        prev = ch
        if ch == "\n":
            last = "\n"
        elif ch not in " \t":
            last = ch


def read_yaml(text: str, source: str) -> tuple[object, dict]:
    """The YAML of a study file as plain data, and {yaml path: line} for error messages."""
    lines: dict = {}
    loader = None
    try:
        _prescan(text, source)
        loader = _LOADER(text)
        node = loader.get_single_node()
        if node is None:
            return None, lines
        _walk(node, "", 0, lines, source)
        lines["top level"] = node.start_mark.line + 1
        return loader.construct_document(node), lines
    except yaml.constructor.ConstructorError as e:  # a tag (!!python/..., !custom): refused
        mark = e.problem_mark or e.context_mark
        raise StudyError(f"YAML tag refused: {C.cut(str(e.problem), 160)}", source=source,
                         line=mark.line + 1 if mark else None,
                         fix="a study file holds plain values (numbers, strings, lists, "
                             "mappings); remove the tag (the text starting with '!')") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise StudyError(f"YAML syntax error: {problem}", source=source,
                         line=mark.line + 1 if mark else None,
                         fix="check the indentation, colons and brackets on this line and "
                             "the one before") from None
    except yaml.YAMLError as e:  # e.g. a NUL or control character (yaml.reader.ReaderError)
        raise StudyError(f"YAML error: {C.cut(str(e).splitlines()[0], 120)}",
                         source=source, fix="check the YAML syntax; a study file is "
                                                 "plain UTF-8 text") from None
    except RecursionError:
        raise StudyError("nesting too deep to parse", source=source,
                         fix="check the brackets") from None
    except StudyError:
        raise
    except (ValueError, OverflowError) as e:  # e.g. an integer of thousands of digits
        raise StudyError(f"a value cannot be read ({C.cut(e, 120)})", source=source,
                         fix="write numbers of a sensible size (1.0e-4, 400)") from None
    finally:
        if loader is not None:
            loader.dispose()

def _walk(node, path: str, depth: int, lines: dict, source: str):
    if depth > 64:
        return
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            line = key.start_mark.line + 1
            if name in seen and name != "<<":
                p = f"{path}.{name}" if path else name
                raise StudyError(f"duplicate key {C._short(name)} (first on line {seen[name]})",
                                 source=source, line=line, path=p,
                                 fix="remove or merge one of them")
            seen[name] = line
            p = f"{path}.{name}" if path else name
            lines[p] = line
            _walk(value, p, depth + 1, lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, f"{path}[{i}]", depth + 1, lines, source)

"""The metric names a PromQL expression reads, so that tests can hold rules and dashboards to /metrics.

A small tokenizer, not a parser: it needs only to tell a metric name from the
other identifiers of PromQL, which are function and aggregation names (always
followed by ``(``, or for an aggregation by ``by``/``without``), keywords and
operators (``and``, ``offset``, ``bool``, ...), label names (inside ``{...}``,
and in the label lists of ``by``, ``without``, ``on``, ``ignoring``,
``group_left`` and ``group_right``) and the numbers ``Inf`` and ``NaN``.
Strings (label values, label_replace's arguments), durations and ranges
(``[5m]``, ``[$__rate_interval]``, ``[1h:5m]``), comments and Grafana's
variables (``$queue``, ``${instance}``, ``[[host]]``) are skipped. A selector
can also name its metric as ``{__name__="x"}`` or, since Prometheus 3,
``{"x"}``. An unknown function is an error, since nothing else would catch a
misspelled one in a dashboard; so is ``__name__`` matched by a regular
expression, whose names cannot be told.
"""

from __future__ import annotations

import re

# Prometheus 3's functions (and those 2.x had that 3 renamed), and `start`/`end` of the `@` modifier.
FUNCTIONS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector
    year start end
    """.split()
)
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()
)
LABEL_LISTS = frozenset("by without on ignoring group_left group_right".split())
KEYWORDS = LABEL_LISTS | frozenset("bool and or unless offset atan2 inf nan".split())

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<comment>\#[^\n]*)
    | (?P<var>\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\])
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy]|\d)*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:;])
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE,
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    for m in _TOKEN.finditer(expr):
        kind = m.lastgroup or "other"
        if kind == "other":
            raise ValueError(f"unexpected {m.group()!r} at {m.start()} in {expr!r}")
        if kind not in ("space", "comment", "var"):
            out.append((kind, m.group()))
    return out


def _check_balanced(tokens: list[tuple[str, str]], expr: str) -> None:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for kind, text in tokens:
        if kind != "op":
            continue
        if text in "([{":
            stack.append(text)
        elif text in pairs and (not stack or stack.pop() != pairs[text]):
            raise ValueError(f"unbalanced {text!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")


def _unquote(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1]
    return token[1:-1].encode().decode("unicode_escape")


def _closing(tokens: list[tuple[str, str]], start: int, open_: str, close: str) -> int:
    """Index of the token closing the bracket opened at ``start``."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] == ("op", open_):
            depth += 1
        elif tokens[i] == ("op", close):
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError("brackets were checked balanced")


def _matchers(tokens: list[tuple[str, str]]) -> list[str]:
    """Names given inside one ``{...}``: ``__name__="x"``, or a bare quoted ``"x"``."""
    names = []
    for i, (kind, text) in enumerate(tokens):
        before = tokens[i - 1][1] if i else ","
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ","
        if kind == "ident" and text == "__name__":
            op, value = tokens[i + 1][1], tokens[i + 2]
            if op != "=" or value[0] != "string":
                raise ValueError("__name__ matched by a regular expression (or negated): its names cannot be told")
            names.append(_unquote(value[1]))
        elif kind == "string" and before == "," and after == ",":
            names.append(_unquote(text))
    return names


def metric_names(expr: str) -> set[str]:
    """Every metric (or recorded series) name the PromQL expression ``expr`` selects."""
    tokens = _tokens(expr)
    _check_balanced(tokens, expr)
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if (kind, text) == ("op", "{"):
            end = _closing(tokens, i, "{", "}")
            names.update(_matchers(tokens[i + 1 : end]))
            i = end
        elif (kind, text) == ("op", "["):
            i = _closing(tokens, i, "[", "]")
        elif kind == "ident":
            word = text.lower()
            if word in LABEL_LISTS and following == "(":
                i = _closing(tokens, i + 1, "(", ")")
            elif word in KEYWORDS:
                pass
            elif word in AGGREGATIONS and following.lower() in ("(", "by", "without"):
                pass
            elif following == "(":
                if text not in FUNCTIONS:
                    raise ValueError(f"unknown function {text!r} in {expr!r}")
            else:
                names.add(text)
        i += 1
    return names


def _split_arguments(inner: str) -> list[str]:
    """Top-level comma-separated arguments (commas inside brackets or strings do not split)."""
    args, depth, start = [], 0, 0
    for kind, m in ((m.lastgroup, m) for m in _TOKEN.finditer(inner)):
        if kind == "op" and m.group() in "({[":
            depth += 1
        elif kind == "op" and m.group() in ")}]":
            depth -= 1
        elif kind == "op" and m.group() == "," and depth == 0:
            args.append(inner[start : m.start()])
            start = m.end()
    return [*args, inner[start:]]


def grafana_query_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus query: PromQL, or a variable's ``label_values(...)``,
    ``query_result(...)`` or ``label_names()``."""
    m = re.fullmatch(r"\s*(label_values|query_result|label_names|metrics)\s*\((.*)\)\s*", query, re.DOTALL)
    if m is None:
        return metric_names(query)
    helper, inner = m.groups()
    if helper == "query_result":
        return metric_names(inner)
    if helper == "label_values":
        args = _split_arguments(inner)
        return metric_names(args[0]) if len(args) == 2 else set()
    if helper == "label_names" and inner.strip():
        return metric_names(inner)
    return set()  # metrics(regex): a pattern, not names

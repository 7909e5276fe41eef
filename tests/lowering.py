"""Reading a lowered (StableHLO) module: where the memory placements sit."""

from __future__ import annotations

import re

PLACEMENT = re.compile(r'_xla_buffer_placement = "(\w+)"')
FUNC = re.compile(r"func\.func (?:public|private) @([\w.$-]+)\(")
CALL = re.compile(r"(?:func\.)?call @([\w.$-]+)\(")


def functions(text: str) -> dict[str, str]:
    """Each function of the module by name, with its body text."""
    starts = [(m.start(), m.group(1)) for m in FUNC.finditer(text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {name: text[s:e] for (s, name), e in zip(starts, ends, strict=True)}


def loop_bodies(body: str) -> list[str]:
    """The text of each `stablehlo.while` body region (`do { ... }`) in `body`."""
    out, lines, i = [], body.splitlines(), 0
    while i < len(lines):
        if lines[i].strip().startswith("} do {"):
            depth, region = 1, []
            i += 1
            while i < len(lines) and depth:
                depth += lines[i].count("{") - lines[i].count("}")
                if depth:
                    region.append(lines[i])
                i += 1
            out.append("\n".join(region))
        else:
            i += 1
    return out


def placements_in_loops(text: str) -> set[str]:
    """Memory placements annotated inside while-loop bodies, directly or in the
    functions those bodies call (at any depth)."""
    funcs = functions(text)
    regions = [region for body in funcs.values() for region in loop_bodies(body)]
    seen: set[str] = set()
    todo = [name for region in regions for name in CALL.findall(region)]
    while todo:
        name = todo.pop()
        if name in seen or name not in funcs:
            continue
        seen.add(name)
        todo.extend(CALL.findall(funcs[name]))
    texts = regions + [funcs[name] for name in seen]
    return {p for t in texts for p in PLACEMENT.findall(t)}

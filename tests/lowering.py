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


# A compiled (scheduled HLO) module, from `compiled.as_text()`.
HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(", re.M)
HLO_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
HLO_OPCODE = re.compile(r"= .*?\s([a-z][\w\-]*)\(")
HOST = "S(5)"  # the host memory space in a GPU layout


def hlo_computations(text: str) -> dict[str, str]:
    """Each computation of a compiled module by name, with its text."""
    starts = [(m.start(), m.group(1)) for m in HLO_COMPUTATION.finditer(text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {name: text[s:e] for (s, name), e in zip(starts, ends, strict=True)}


def hlo_loop_computations(text: str) -> list[str]:
    """The text of every computation a while-loop body runs, at any depth."""
    comps = hlo_computations(text)
    todo = re.findall(r"\bwhile\(.*?body=%([\w.\-]+)", text)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen and name in comps:
            seen.add(name)
            todo.extend(HLO_CALLEE.findall(comps[name]))
    return [comps[name] for name in seen]


def host_ops_in_loops(text: str) -> set[str]:
    """The opcodes of the loop computations that touch host memory."""
    return {
        op
        for comp in hlo_loop_computations(text)
        if HOST in comp
        for op in HLO_OPCODE.findall(comp)
    }

"""Prompt text for the LLM: ComfyUI's weighting syntax belongs to CLIP, not to the LLM.

"(red dress:1.3)" makes sense to CLIPTextEncode; to an LLM it is noise. The LLM reads the plain words,
CLIP (hybrid mode) still gets the weighted text. Escaped parentheses stay as literal text.
"""

from __future__ import annotations

import re

_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*$")
_EMBEDDING = re.compile(r"\bembedding:[^\s,()]+")


def strip_prompt_weights(text: str) -> str:
    """'a (red:1.2) ((dress)) \\(tm\\)' -> 'a red dress (tm)'; 'embedding:x' tokens are dropped."""
    text = _EMBEDDING.sub("", text)
    out: list[str] = []
    stack: list[int] = []  # start indices in `out` of open groups
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "()":
            out.append(text[i + 1])
            i += 2
            continue
        if ch == "(":
            stack.append(len(out))
        elif ch == ")" and stack:
            start = stack.pop()
            group = "".join(out[start:])
            out[start:] = list(_WEIGHT.sub("", group))
        else:
            out.append(ch)
        i += 1
    return re.sub(r"[ \t]{2,}", " ", "".join(out)).strip()


def split_prompts(text: str, per_line: bool) -> list[str]:
    """One prompt, or one per non-empty line (a batch of different prompts)."""
    if not per_line:
        return [text]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines or [""]

"""`nanopipe chat`: talk to a checkpoint in the terminal.

Interactive (a REPL keeping the conversation; /new starts over, /quit or Ctrl-D leaves, Ctrl-C
stops a reply), or one-shot with -p PROMPT. Replies stream token by token. Tool calls the
model makes are run by the engine and shown inline with their special tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from nanopipe.chat import render_for_completion
from nanopipe.engine import Engine, TextStream

HELP = "Commands: /new (start a new conversation), /quit (or Ctrl-D). Ctrl-C stops a reply."


def assistant_content(tokenizer, tokens: list[int]) -> str | list[dict]:
    """A generated reply as chat-format content: plain text, or parts when it called a tool
    (so the tool call goes back into the next prompt as tokens, not as text)."""
    kinds = {tokenizer.id_of("<|python_start|>"): "python", tokenizer.id_of("<|output_start|>"): "python_output"}
    ends = {tokenizer.id_of("<|python_end|>"), tokenizer.id_of("<|output_end|>")}
    parts: list[dict] = []
    kind, run = "text", []

    def close():
        text = tokenizer.decode(run)
        if text.strip() or kind == "python_output":  # a tool may print nothing; text and code may not
            parts.append({"type": kind, "text": text})

    for t in tokens:
        if t in kinds:
            close()
            kind, run = kinds[t], []
        elif t in ends:
            close()
            kind, run = "text", []
        else:
            run.append(t)
    close()
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def reply(engine: Engine, messages: list[dict], out: TextIO, temperature: float, top_k: int | None,
          max_tokens: int) -> list[int]:
    """Stream one assistant reply to `out`; returns its tokens. Old turns are dropped when the
    conversation no longer fits the context."""
    tok = engine.tokenizer
    while True:
        prompt = render_for_completion(tok, {"messages": messages})
        if len(prompt) < engine.max_seq_len or len(messages) <= 1:
            break
        del messages[:2]  # the oldest user/assistant exchange
    if len(prompt) >= engine.max_seq_len:
        raise ValueError(f"this message is {len(prompt)} tokens; the model's context holds {engine.max_seq_len}")
    text = TextStream(tok)
    tokens: list[int] = []
    for event in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k):
        if event.token is None:
            out.write(text.flush())
            if event.finish_reason == "error":
                out.write(" [generation failed]")
            break
        tokens.append(event.token)
        out.write(text.push(event.token))
        out.flush()
    out.write("\n")
    out.flush()
    return tokens


def repl(engine: Engine, name: str, temperature: float, top_k: int | None, max_tokens: int,
         read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The interactive loop. `read` is input() (with readline's line editing and history when
    available); tests pass a scripted one."""
    out.write(f"nanopipe chat with {name} (temperature {temperature}, top-k {top_k}). {HELP}\n")
    messages: list[dict] = []
    while True:
        try:
            line = read("\nyou> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line in ("/new", "/clear"):
            messages = []
            out.write("(new conversation)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]!r}. {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("assistant> ")
        out.flush()
        try:
            tokens = reply(engine, messages, out, temperature, top_k, max_tokens)
        except KeyboardInterrupt:
            engine.reset()  # the interrupt may have landed inside a step
            out.write("\n(stopped)\n")
            messages.pop()
            continue
        except ValueError as e:
            out.write(f"\nerror: {e}\n")
            messages.pop()
            continue
        content = assistant_content(engine.tokenizer, tokens)
        if content:
            messages.append({"role": "assistant", "content": content})
        else:
            messages.pop()  # an empty reply cannot go back into the prompt: forget the turn


def chat_main(store_url: str | None, model: str | None, prompt: str | None, temperature: float,
              top_k: int | None, max_tokens: int, device: str) -> None:
    """`nanopipe chat`: load a checkpoint from the store onto `device` (auto, cpu or cuda; see
    nanopipe.device); answer `prompt` and exit, or start the REPL."""
    from nanopipe.engine import load_engine

    engine, name = load_engine(store_url, model, device=device, max_batch=1)
    try:
        if prompt is not None:
            reply(engine, [{"role": "user", "content": prompt}], sys.stdout, temperature, top_k, max_tokens)
            return
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        repl(engine, name, temperature, top_k, max_tokens)
    finally:
        engine.close()

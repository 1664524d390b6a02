"""The choices of one OpenAI request: started on the frontend, run to the end, and turned into
OpenAI's response bodies and stream chunks.

A request holds one or more prompts (a completions batch) and best_of >= n generations per
prompt; choice `index` is prompt * n + rank. Every generation runs at once in the engine, so
choices of one prompt share its prefill through the prefix cache. best_of > n keeps the n whose
tokens have the highest summed logprob.
"""

import asyncio
import dataclasses
from typing import AsyncIterator

from jblock.serving import tool_calls
from jblock.serving.frontend import Frontend
from jblock.serving.generation import Generation
from jblock.serving.openai_logprobs import (TokenText, chat_logprobs, completion_logprobs,
                                            cumulative_logprob, merge_completion_logprobs)
from jblock.serving.openai_requests import ParsedRequest


@dataclasses.dataclass
class Choice:
  prompt_index: int
  generation: Generation
  echo_text: str = ""  # completions with echo: the prompt's text, which the choice starts with
  token_ids: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  parts: list = dataclasses.field(default_factory=list)  # text deltas

  @property
  def text(self) -> str:
    return "".join(self.parts)


async def start(frontend: Frontend, principal, parsed: ParsedRequest) -> list[Choice]:
  """Admits and submits every generation of the request; on a refusal closes those started."""
  choices: list[Choice] = []
  try:
    for i, request in enumerate(parsed.requests):
      for generation in await frontend.agenerate_choices(principal, request, parsed.best_of):
        choices.append(Choice(i, generation, _echo_text(parsed, request, generation)))
  except BaseException:
    close(choices, "CANCELLED")
    raise
  return choices


def _echo_text(parsed: ParsedRequest, request, generation: Generation) -> str:
  if not parsed.echo:
    return ""
  if request.text is not None:
    return request.text
  return generation.decode(generation.prompt_tokens)


def close(choices: list[Choice], status: str | None = None) -> None:
  for choice in choices:
    choice.generation.close(status)


async def run_all(choices: list[Choice], disconnected) -> bool:
  """Runs every choice to its end; False (all closed) if `disconnected()` turned true first."""
  async def collect(choice: Choice) -> None:
    async for delta in choice.generation:
      choice.parts.append(delta.text)
      choice.token_ids.extend(delta.token_ids)
      choice.logprobs.extend(delta.logprobs)

  task = asyncio.gather(*(collect(c) for c in choices))
  while True:
    done, _ = await asyncio.wait({task}, timeout=0.5)
    if done:
      task.result()  # raises the first choice's error
      return True
    if await disconnected():
      task.cancel()
      close(choices, "CANCELLED")
      return False


def finish_reason(choice: Choice, calls: bool = False) -> str:
  if calls:
    return tool_calls.TOOL_CALLS_FINISH_REASON
  return "length" if choice.generation.finish_reason == "length" else "stop"


def _parses_calls(parsed: ParsedRequest) -> bool:
  return parsed.chat and parsed.tools is not None and parsed.tools.choice != "none"


def kept(parsed: ParsedRequest, choices: list[Choice]) -> list[Choice]:
  """The n choices per prompt that are returned, in index order (best_of ranks by logprob)."""
  out = []
  for i in range(len(parsed.requests)):
    mine = [c for c in choices if c.prompt_index == i]
    if parsed.best_of > parsed.n:
      mine = sorted(mine, key=lambda c: -cumulative_logprob(c.logprobs))[:parsed.n]
    out.extend(mine)
  return out


def usage(choices: list[Choice], parsed: ParsedRequest) -> dict:
  """Prompt tokens once per prompt; completion tokens of every generation run (best_of too)."""
  prompts = {c.prompt_index: c.generation.usage.prompt_tokens for c in choices}
  completion = 0 if parsed.drop_output else sum(c.generation.usage.completion_tokens
                                                for c in choices)
  return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
          "total_tokens": sum(prompts.values()) + completion}


def _completion_logprobs(parsed: ParsedRequest, choice: Choice, token_text: TokenText,
                         output: bool = True) -> dict:
  generation = choice.generation
  parts = []
  if parsed.echo:
    parts.append(completion_logprobs(generation.handle.prompt_logprobs,
                                     generation.prompt_tokens, token_text, parsed.logprobs))
  if output and not parsed.drop_output:
    parts.append(completion_logprobs(choice.logprobs, choice.token_ids, token_text,
                                     parsed.logprobs, offset=len(choice.echo_text)))
  return merge_completion_logprobs(parts)


def body(parsed: ParsedRequest, choices: list[Choice], head: dict) -> dict:
  """The whole (non-streamed) response."""
  out = []
  for index, choice in enumerate(kept(parsed, choices)):
    token_text = TokenText(choice.generation.tokenizer)
    entry = {"index": index, "logprobs": None, "finish_reason": finish_reason(choice)}
    text = "" if parsed.drop_output else choice.text
    if _parses_calls(parsed):
      content, calls = tool_calls.extract(text, parsed.tool_parser, parsed.tools)
      entry["message"] = {"role": "assistant", "content": content,
                          "tool_calls": [c.to_openai() for c in calls]}
      entry["finish_reason"] = finish_reason(choice, bool(calls))
    elif parsed.chat:
      entry["message"] = {"role": "assistant", "content": text}
    if parsed.chat:
      if parsed.logprobs is not None:
        entry["logprobs"] = {"content": chat_logprobs(choice.logprobs, token_text,
                                                      parsed.logprobs)}
    else:
      entry["text"] = choice.echo_text + text
      if parsed.logprobs is not None:
        entry["logprobs"] = _completion_logprobs(parsed, choice, token_text)
    out.append(entry)
  kind = "chat.completion" if parsed.chat else "text_completion"
  return {**head, "object": kind, "choices": out, "usage": usage(choices, parsed)}


async def chunks(parsed: ParsedRequest, choices: list[Choice], head: dict) -> AsyncIterator[dict]:
  """The streamed response's chunks (choices interleaved as their tokens come), then usage."""
  kind = "chat.completion.chunk" if parsed.chat else "text_completion"

  def chunk(index: int, text: str | None, finish: str | None = None, logprobs=None,
            first: bool = False, delta: dict | None = None) -> dict:
    entry = {"index": index, "logprobs": logprobs, "finish_reason": finish}
    if parsed.chat:
      entry["delta"] = ({"role": "assistant", "content": ""} if first else delta if delta else
                        {} if text is None else {"content": text})
    else:
      entry["text"] = text or ""
    out = {**head, "object": kind, "choices": [entry]}
    if parsed.include_usage:
      out["usage"] = None
    return out

  texts = {index: TokenText(c.generation.tokenizer) for index, c in enumerate(choices)}
  calls = ({index: tool_calls.ToolCallStream(parsed.tool_parser, parsed.tools)
            for index in range(len(choices))} if _parses_calls(parsed) else None)
  offsets = {index: len(c.echo_text) for index, c in enumerate(choices)}
  for index, choice in enumerate(choices):
    if parsed.chat:
      yield chunk(index, None, first=True)
    elif parsed.echo:
      logprobs = (_completion_logprobs(parsed, choice, texts[index], output=False)
                  if parsed.logprobs is not None else None)
      yield chunk(index, choice.echo_text, logprobs=logprobs)
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(index: int, choice: Choice) -> None:
    try:
      async for delta in choice.generation:
        await queue.put((index, delta, None))
      await queue.put((index, None, None))
    except Exception as e:  # handed to the stream, which ends with an error event
      await queue.put((index, None, e))

  tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
  try:
    remaining = len(tasks)
    while remaining:
      index, delta, error = await queue.get()
      if error is not None:
        raise error
      choice = choices[index]
      if delta is None:
        remaining -= 1
        if calls is not None:
          for piece in calls[index].finish():
            yield chunk(index, None, delta=piece)
        yield chunk(index, None, finish_reason(choice, bool(calls and calls[index].calls)))
        continue
      choice.token_ids.extend(delta.token_ids)
      if parsed.drop_output or not (delta.text or delta.logprobs):
        continue
      if calls is not None:  # content and tool-call deltas as the parser sees them
        for piece in calls[index].feed(delta.text):
          yield chunk(index, None, delta=piece)
        continue
      logprobs = None
      if parsed.logprobs is not None and parsed.chat:
        logprobs = {"content": chat_logprobs(delta.logprobs, texts[index], parsed.logprobs)}
      elif parsed.logprobs is not None:
        logprobs = completion_logprobs(delta.logprobs, delta.token_ids, texts[index],
                                       parsed.logprobs, offset=offsets[index])
        offsets[index] += sum(len(t) for t in logprobs["tokens"])
      yield chunk(index, delta.text, logprobs=logprobs)
    if parsed.include_usage:
      yield {**head, "object": kind, "choices": [], "usage": usage(choices, parsed)}
  finally:
    for task in tasks:
      task.cancel()


__all__ = ["Choice", "body", "chunks", "close", "run_all", "start"]

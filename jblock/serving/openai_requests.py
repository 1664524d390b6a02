"""OpenAI request bodies -> GenerationRequests: the JSON types and OpenAI's own rules checked here.

The ranges of the sampling fields are the engine's (engine_api.validate_request), the same for
gRPC; here only JSON types, OpenAI's combinations (best_of >= n, top_logprobs needs logprobs,
max_tokens 0 only with echo) and the bounds of what one HTTP request may fan out to.

Fields beyond OpenAI's, as vLLM accepts them: top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids. Refused with a 400 naming the field: suffix (no fill-in-the-middle
model is served), chat `echo`, and `functions` / `function_call` (the legacy form of tools).
Chat `tools` and `tool_choice` are checked by jblock.serving.tool_calls; "required" and a named
function become a json_schema response_format, so the arguments follow the function's schema.
"""

import dataclasses

from jblock.errors import InvalidRequestError
from jblock.serving import tool_calls
from jblock.serving.frontend import GenerationRequest

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_USER_CHARS = 256
MAX_CHOICES = 16  # n and best_of
MAX_PROMPTS = 64  # prompts in one /v1/completions request (a batch, as lm-eval sends)
MAX_COMPLETION_LOGPROBS = 20


@dataclasses.dataclass
class ParsedRequest:
  """What one HTTP request asks for: a GenerationRequest per prompt, and how to answer."""
  requests: list[GenerationRequest]
  chat: bool
  stream: bool = False
  include_usage: bool = False
  n: int = 1
  best_of: int = 1  # choices generated per prompt; the n best (by logprob) are returned
  echo: bool = False  # completions: the prompt's text (and its logprobs) comes first
  logprobs: int | None = None  # alternatives per token in the response (None: no logprobs)
  drop_output: bool = False  # max_tokens 0 with echo: one token is computed, none returned
  response_format: dict | None = None
  tools: object = None  # jblock.serving.tool_calls.ToolSpec, when the request has tools
  tool_parser: str = tool_calls.DEFAULT_TOOL_CALL_PARSER  # the server's --tool_call_parser


def _int(data: dict, key: str):
  value = data.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise InvalidRequestError(key, f"must be an integer, got {type(value).__name__}")
  return value


def _number(data: dict, key: str):
  """A JSON number as parsed (NaN and Infinity too: the engine refuses them, naming `key`)."""
  value = data.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise InvalidRequestError(key, f"must be a number, got {type(value).__name__}")
  return value


def _bool(data: dict, key: str) -> bool:
  value = data.get(key, False)
  if value is None:
    return False
  if not isinstance(value, bool):
    raise InvalidRequestError(key, "must be true or false")
  return value


def _unsupported(data: dict, key: str, why: str) -> None:
  """Refuses a field set to anything but its no-op values (absent, null, false, empty)."""
  value = data.get(key)
  if value is None or value is False or value in ({}, [], ""):
    return
  raise InvalidRequestError(key, f"is not supported by this server: {why}")


def _logit_bias(data: dict) -> dict[int, float] | None:
  bias = data.get("logit_bias")
  if bias is None:
    return None
  if not isinstance(bias, dict):
    raise InvalidRequestError("logit_bias", "must map token ids to numbers")
  out = {}
  for key, value in bias.items():
    try:
      token = int(key)
    except ValueError:
      raise InvalidRequestError("logit_bias", f"key {key[:20]!r} is not a token id") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise InvalidRequestError("logit_bias", f"token {token}: the bias must be a number")
    out[token] = value
  return out


def _token_ids(value, field: str) -> list[int]:
  if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in value):
    raise InvalidRequestError(field, "must be a list of token ids")
  return value


def _common(data: dict, *, chat: bool) -> tuple[GenerationRequest, ParsedRequest]:
  """The fields both endpoints share."""
  model = data.get("model")
  if not isinstance(model, str) or not model:
    raise InvalidRequestError("model", "is required (a model name from GET /v1/models)")
  _unsupported(data, "suffix", "no fill-in-the-middle model is served")
  _unsupported(data, "functions", "send tools instead")
  _unsupported(data, "function_call", "send tool_choice instead")
  n = _int(data, "n")
  n = 1 if n is None else n
  if not 1 <= n <= MAX_CHOICES:
    raise InvalidRequestError("n", f"must be in [1, {MAX_CHOICES}], got {n}")
  stop = data.get("stop")
  if isinstance(stop, str):
    stop = [stop]
  elif stop is None:
    stop = []
  elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise InvalidRequestError("stop", "must be a string or a list of strings")
  user = data.get("user")  # OpenAI's end-user id: accepted, not used
  if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
    raise InvalidRequestError("user", f"must be a string of at most {MAX_USER_CHARS} characters")
  max_tokens = _int(data, "max_tokens")
  if chat and _int(data, "max_completion_tokens") is not None:  # OpenAI's newer name wins
    max_tokens = data["max_completion_tokens"]
  sampling = {}
  for key in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
    if _number(data, key) is not None:
      sampling[key] = data[key]
  if _int(data, "min_tokens") is not None:
    sampling["min_tokens"] = data["min_tokens"]
  if _bool(data, "ignore_eos"):
    sampling["ignore_eos"] = True
  bias = _logit_bias(data)
  if bias:
    sampling["logit_bias"] = bias
  stop_ids = data.get("stop_token_ids")
  request = GenerationRequest(
      model=model, max_tokens=max_tokens, temperature=_number(data, "temperature"),
      top_p=_number(data, "top_p"), top_k=_int(data, "top_k"), seed=_int(data, "seed"),
      stop=tuple(stop), sampling=sampling,
      stop_token_ids=() if stop_ids is None else tuple(_token_ids(stop_ids, "stop_token_ids")))
  options = data.get("stream_options")
  if options is not None and not isinstance(options, dict):
    raise InvalidRequestError("stream_options", "must be an object")
  include_usage = (options or {}).get("include_usage")
  if include_usage is not None and not isinstance(include_usage, bool):
    raise InvalidRequestError("stream_options.include_usage", "must be true or false")
  response_format = data.get("response_format")
  if response_format is not None and not isinstance(response_format, dict):
    raise InvalidRequestError("response_format", "must be an object")
  request.response_format = response_format
  parsed = ParsedRequest([request], chat, stream=_bool(data, "stream"),
                         include_usage=bool(include_usage), n=n,
                         best_of=n, response_format=response_format)
  return request, parsed


def _prompts(data: dict) -> list[dict]:
  """The prompts of a completions request as {text} or {token_ids}: a string, token ids, or a
  batch of either."""
  prompt = data.get("prompt")
  if isinstance(prompt, str):
    return [{"text": prompt}]
  if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in prompt):
    return [{"token_ids": prompt}]
  if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    if len(prompt) > MAX_PROMPTS:
      raise InvalidRequestError("prompt", f"a batch of {len(prompt)} prompts; at most "
                                f"{MAX_PROMPTS} per request")
    return [{"text": p} if isinstance(p, str) else
            {"token_ids": _token_ids(p, f"prompt[{i}]") or _empty(i)}
            for i, p in enumerate(prompt)]
  raise InvalidRequestError("prompt", "must be a string, a list of token ids, or a batch of "
                            "either")


def _empty(i: int):
  raise InvalidRequestError(f"prompt[{i}]", "is empty; send at least one token")


def completion_request(data: dict) -> ParsedRequest:
  request, parsed = _common(data, chat=False)
  best_of = _int(data, "best_of")
  if best_of is not None:
    if not parsed.n <= best_of <= MAX_CHOICES:
      raise InvalidRequestError("best_of", f"must be in [n, {MAX_CHOICES}], got {best_of}")
    if best_of > parsed.n and parsed.stream:
      raise InvalidRequestError("best_of", "cannot be larger than n when streaming")
    parsed.best_of = best_of
  parsed.echo = _bool(data, "echo")
  logprobs = data.get("logprobs")
  if logprobs is not None and logprobs is not False:
    if isinstance(logprobs, bool) or not isinstance(logprobs, int):
      raise InvalidRequestError("logprobs", "must be an integer (alternatives per token)")
    if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
      raise InvalidRequestError("logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}]")
    parsed.logprobs = logprobs
    request.sampling["logprobs"] = logprobs
    if parsed.echo:
      request.sampling["prompt_logprobs"] = logprobs
  if parsed.best_of > parsed.n:  # choices are ranked by their tokens' logprobs
    request.sampling.setdefault("logprobs", 0)
  if request.max_tokens is None:
    request.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
  elif request.max_tokens == 0 and parsed.echo:
    request.max_tokens, parsed.drop_output = 1, True  # the prompt (and its logprobs) only
  parsed.requests = [dataclasses.replace(request, sampling=dict(request.sampling), **prompt)
                     for prompt in _prompts(data)]
  return parsed


def chat_request(data: dict) -> ParsedRequest:
  request, parsed = _common(data, chat=True)
  _unsupported(data, "echo", "chat responses do not repeat the messages")
  _unsupported(data, "best_of", "chat completions have no best_of")
  messages = data.get("messages")
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages", "must be a non-empty list")
  request.messages = messages
  request.max_tokens_to_context = request.max_tokens is None
  parsed.tools = tool_calls.parse_tools(data.get("tools"), data.get("tool_choice"),
                                        parallel_tool_calls=data.get("parallel_tool_calls"))
  if parsed.tools is not None:
    request.tools = parsed.tools.template_tools
    forced = tool_calls.forced_call_format(parsed.tools)
    if forced is not None:  # "required" or a named function: the output is the call(s)
      if parsed.response_format not in (None, {"type": "text"}):
        raise InvalidRequestError("response_format", f"cannot be combined with tool_choice "
                                  f"{data.get('tool_choice')!r}")
      parsed.response_format = request.response_format = forced
  top = _int(data, "top_logprobs")
  if _bool(data, "logprobs"):
    if top is not None and not 0 <= top <= MAX_COMPLETION_LOGPROBS:
      raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_COMPLETION_LOGPROBS}]")
    parsed.logprobs = top or 0
    request.sampling["logprobs"] = parsed.logprobs
  elif top:
    raise InvalidRequestError("top_logprobs", "needs logprobs: true")
  return parsed


__all__ = ["COMPLETIONS_DEFAULT_MAX_TOKENS", "MAX_CHOICES", "MAX_PROMPTS", "ParsedRequest",
           "chat_request", "completion_request"]

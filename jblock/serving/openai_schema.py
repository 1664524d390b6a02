"""Typed OpenAI request and response bodies (pydantic), for the OpenAPI document of the HTTP API.

These models describe; they do not validate at run time. Requests are checked where they always
were, so each rule and its message live in one place: JSON types and OpenAI's combinations in
openai_requests.py, sampling ranges in engine_api.validate_sampling (shared with gRPC), messages
and stop strings in prompts.py, tools in tool_calls.py, response_format in grammar.py. Bounds are
those modules' constants, imported. tests/serving/test_openapi_fuzz.py holds the two together:
what this schema refuses, the server must refuse. Unknown fields are allowed and ignored (OpenAI
clients send vendor fields). Integers are JSON integers: 2.0 is refused, as it always was,
though JSON Schema counts it an integer.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import models_json_schema

from jblock.runtime.engine_api import (MAX_LOGIT_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY,
                                       MAX_SEED, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MAX_TOP_K)
from jblock.serving.openai_requests import (MAX_CHOICES, MAX_COMPLETION_LOGPROBS, MAX_PROMPTS,
                                            MAX_USER_CHARS)
from jblock.serving.prompts import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from jblock.serving.tool_calls import MAX_TOOLS

REF_TEMPLATE = "#/components/schemas/{model}"
# Function and json_schema names, as tool_calls and grammar check them.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

TokenIds = list[Annotated[int, Field(ge=0)]]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
# Token ids as strings -> [-100, 100]; keys are constrained with propertyNames (pydantic would
# write patternProperties, which leaves other keys unchecked).
LogitBias = Annotated[dict[str, float], WithJsonSchema({
    "type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})]
# A field this server refuses unless it is one of the no-op values (openai_requests._unsupported).
NoOp = Literal["", False] | Annotated[list[Any], Field(max_length=0)] | \
    Annotated[dict[str, Any], Field(max_length=0)] | None


class _Open(BaseModel):
  """A JSON object whose unknown fields are accepted and ignored."""
  model_config = ConfigDict(extra="allow")


# --- requests: the parts
class StreamOptions(_Open):
  include_usage: bool | None = Field(None, description="Send a last chunk with the usage of the "
                                     "whole request (its `choices` empty).")


class ResponseFormatText(_Open):
  type: Literal["text"]


class ResponseFormatJsonObject(_Open):
  type: Literal["json_object"]  # any JSON object


class JsonSchemaFormat(_Open):
  name: str = Field(pattern=NAME_PATTERN)
  description: Any = Field(None, description="Not used.")
  schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output "
                                  "follows (at most 64 KiB of JSON).")
  strict: bool | None = Field(None, description="Refuse schema keywords the engine cannot "
                              "enforce (false: they are ignored).")


class ResponseFormatJsonSchema(_Open):
  type: Literal["json_schema"]
  json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class FunctionDefinition(_Open):
  name: str = Field(pattern=NAME_PATTERN)
  description: str | None = None
  parameters: dict[str, Any] | None = Field(None, description='A JSON Schema of type "object" '
                                            "for the arguments (none: no arguments).")
  strict: bool | None = None


class Tool(_Open):
  type: Literal["function"]
  function: FunctionDefinition


class FunctionName(_Open):
  name: str = Field(description="One of the request's tools.")


class NamedToolChoice(_Open):
  type: Literal["function"]
  function: FunctionName


class TextPart(_Open):  # the only kind of content part supported
  type: Literal["text"]
  text: str


Content = str | list[TextPart]


class CalledFunction(_Open):
  name: str = Field(min_length=1)
  arguments: str | dict[str, Any] = Field(description="JSON text of an object (as OpenAI sends "
                                          "it) or the object.")


class MessageToolCall(_Open):
  id: str | None = None
  type: Literal["function"] = "function"
  function: CalledFunction


class _Message(_Open):
  name: Any = Field(None, description="A participant's name (not used).")


class PlainMessage(_Message):
  role: Literal["system", "developer", "user"]
  content: Content = Field(description="Text, or text parts (joined).")


class AssistantTurn(_Message):
  """An earlier answer, with the tool calls it made."""
  role: Literal["assistant"]
  content: Content | None = Field(None, description="null only beside tool_calls.")
  tool_calls: list[MessageToolCall] | None = None


class ToolMessage(_Message):
  role: Literal["tool"]
  content: Content = Field(description="What the tool returned.")
  tool_call_id: str | None = Field(None, description="The call this answers.")


ChatMessage = Annotated[PlainMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


# --- requests: the bodies
class _Sampling(_Open):
  """What /v1/completions and /v1/chat/completions share."""
  model: str = Field(min_length=1, description="A model name from GET /v1/models.")
  temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, description="Sampling "
                                    "temperature; 0 is greedy. Default 0.")
  top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling: keep the most "
                              "likely tokens whose probabilities add up to top_p. Default 1.")
  # vLLM's extensions: top_k, min_p, repetition_penalty, stop_token_ids, min_tokens, ignore_eos.
  top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="Keep the k most likely "
                            "tokens; 0 is off.")
  min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens below min_p times the "
                              "top token's probability; 0 is off.")
  presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY, description=(
      "Subtracted once from the logit of every token already generated."))
  frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY, description=(
      "Subtracted from a token's logit per time it was generated."))
  repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY, description=(
      "Divides positive (multiplies negative) logits of tokens seen; 1 is off."))
  logit_bias: LogitBias | None = Field(None, description="Token id (as a string) -> a bias "
                                       "added to its logit.")
  seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Makes sampling repeatable.")
  stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = \
      Field(None, description="Strings that end the output (not included in it).")
  stop_token_ids: TokenIds | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                          description="Token ids that end the output.")
  min_tokens: int | None = Field(None, ge=0, description="Stop tokens cannot end the output "
                                 "before this many tokens.")
  ignore_eos: bool | None = Field(None, description="End-of-sequence tokens do not end it.")
  n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices to return (per prompt).")
  stream: bool | None = Field(None, description="Stream the output as server-sent events, "
                              "ending with data: [DONE].")
  stream_options: StreamOptions | None = None
  response_format: ResponseFormat | None = Field(None, description="Constrain the output: "
                                                 "free text, any JSON object, or a JSON Schema.")
  user: str | None = Field(None, max_length=MAX_USER_CHARS, description="An end-user id (not "
                           "used).")
  functions: NoOp = Field(None, deprecated=True, description="Legacy function calling: "
                          "refused (unless empty); send tools.")
  function_call: NoOp = Field(None, deprecated=True, description="Legacy function calling: "
                              "refused (unless empty); send tool_choice.")


Prompt = (Annotated[str, Field(description="Text.")]
          | Annotated[TokenIds, Field(min_length=1, description="Token ids.")]
          | Annotated[list[str | Annotated[TokenIds, Field(min_length=1)]],
                      Field(min_length=1, max_length=MAX_PROMPTS,
                            description="A batch of prompts, text or token ids.")])


class CompletionRequest(_Sampling):
  """The body of POST /v1/completions."""
  prompt: Prompt = Field(description="A string, token ids, or a batch of either.")
  max_tokens: int | None = Field(None, ge=0, description="New tokens at most (default 16); 0 "
                                 "only with echo (the prompt's logprobs alone).")
  echo: bool | None = Field(None, description="The output starts with the prompt.")
  logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | Literal[False] | None = Field(
      None, description="Log probabilities of each output token and of this many alternatives.")
  best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Generate this many "
                              "choices per prompt (at least n) and return the n most likely.")
  suffix: NoOp = Field(None, description="Refused (unless empty): no fill-in-the-middle model.")


class ChatCompletionRequest(_Sampling):
  """The body of POST /v1/chat/completions."""
  messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
  max_tokens: int | None = Field(None, ge=1, description="New tokens at most (default: up to "
                                 "the model's context length).")
  max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for "
                                            "max_tokens (wins when both are given).")
  logprobs: bool | None = Field(None, description="Log probabilities of each output token.")
  top_logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, description=(
      "Alternatives per token (needs logprobs: true)."))
  tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description="Functions the model "
                                   "may call.")
  tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
      None, description='"auto" (the default with tools), "none", "required", or one named '
      "function.")
  parallel_tool_calls: bool | None = Field(None, description="false: one tool call at most.")
  echo: NoOp = Field(None, description="Refused (unless false): chat does not repeat messages.")
  best_of: NoOp = Field(None, description="Refused (unless empty): chat has no best_of.")


# --- responses
class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int = Field(description="Every generated choice's (best_of's too).")
  total_tokens: int


class CompletionLogprobs(BaseModel):
  """One entry per token; with echo the prompt's come first (the first has no logprob)."""
  tokens: list[str]
  token_logprobs: list[float | None]
  top_logprobs: list[dict[str, float] | None]
  text_offset: list[int]


class CompletionChoice(BaseModel):
  index: int
  text: str
  logprobs: CompletionLogprobs | None
  finish_reason: Literal["stop", "length"]


class _Head(BaseModel):
  id: str
  created: int = Field(description="Unix seconds.")
  model: str


class CompletionResponse(_Head):
  object: Literal["text_completion"]
  choices: list[CompletionChoice]
  usage: Usage


class CompletionChunkChoice(CompletionChoice):
  finish_reason: Literal["stop", "length"] | None  # set on a choice's last chunk


class CompletionChunk(_Head):
  """One event of a streamed completion; with include_usage the last has no choices."""
  object: Literal["text_completion"]
  choices: list[CompletionChunkChoice]
  usage: Usage | None = None


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
  content: list[ChatTokenLogprob] | None


class ToolCallFunction(BaseModel):
  name: str
  arguments: str = Field(description="The JSON text of an object.")


class ToolCall(BaseModel):
  id: str
  type: Literal["function"]
  function: ToolCallFunction


class AssistantMessage(BaseModel):
  role: Literal["assistant"]
  content: str | None
  tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
  index: int
  message: AssistantMessage
  logprobs: ChatLogprobs | None
  finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(_Head):
  object: Literal["chat.completion"]
  choices: list[ChatChoice]
  usage: Usage


class ToolCallDelta(BaseModel):
  """A call streams whole: a delta with its id, type and name, then one with its arguments."""
  index: int
  id: str | None = None
  type: Literal["function"] | None = None
  function: dict[str, str]


class ChatDelta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None
  tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
  index: int
  delta: ChatDelta
  logprobs: ChatLogprobs | None
  finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(_Head):
  """One event of a streamed chat completion; with include_usage the last has no choices."""
  object: Literal["chat.completion.chunk"]
  choices: list[ChatChunkChoice]
  usage: Usage | None = None


class ErrorDetail(BaseModel):
  message: str
  type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                    "rate_limit_error or server_error.")
  param: str | None = Field(description="The request field at fault, e.g. messages[0].role.")
  code: str | None


class ErrorResponse(BaseModel):
  """Every error, with its HTTP status; a stream that fails midway sends one as an event."""
  error: ErrorDetail


_MODELS = (CompletionRequest, ChatCompletionRequest, CompletionResponse, CompletionChunk,
           ChatCompletionResponse, ChatCompletionChunk, ErrorResponse)
_ERRORS = {"400": "The request is malformed or out of range (`param` names the field).",
           "401": "No API key, or an unknown one.",
           "404": "No such model (or not one this key may use).",
           "429": "Over a quota or the server's capacity; Retry-After says when to try again.",
           "503": "The server is draining."}


def components() -> dict[str, dict]:
  """The JSON schemas of every body, keyed by model name, for the document's components."""
  _, top = models_json_schema([(model, "validation") for model in _MODELS],
                              ref_template=REF_TEMPLATE)
  return top["$defs"]


def _ref(model: type[BaseModel]) -> dict:
  return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def operation(request: type[BaseModel], response: type[BaseModel],
              chunk: type[BaseModel]) -> dict:
  """A generation route's `openapi_extra`: its JSON body and its answers: JSON, or when the
  request streams server-sent events (OpenAPI 3.1: the schema describes each event)."""
  event = {"type": "object", "required": ["data"], "properties": {
      "event": {"type": "string"},
      "data": {"type": "string", "contentMediaType": "application/json", "description":
               f"A {chunk.__name__} (an ErrorResponse if the stream fails), [DONE] last."}}}
  error = {"application/json": {"schema": _ref(ErrorResponse)}}
  return {"requestBody": {"required": True,
                          "content": {"application/json": {"schema": _ref(request)}}},
          "responses": {"200": {"description": f"A {response.__name__}, or {chunk.__name__} "
                                "events with stream: true.",
                                "content": {"application/json": {"schema": _ref(response)},
                                            "text/event-stream": {"schema": event}}},
                        **{status: {"description": why, "content": error}
                           for status, why in _ERRORS.items()}}}


__all__ = ["ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse",
           "CompletionChunk", "CompletionRequest", "CompletionResponse", "ErrorResponse",
           "components", "operation"]

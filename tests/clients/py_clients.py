"""
LlamaIndex and instructor against the gateway, run in tests/clients/.venv
(see requirements.txt beside this file) by tests/test_clients.py::

    CLAWDBOT_URL=http://host:port/v1 CLAWDBOT_TOKEN=... python py_clients.py CASE

Prints one JSON object: what the case saw, or the error the client raised,
and C{tiktoken}: the encodings the libraries tried to load (each one a
download from the internet on first use, which must never happen).
"""

import json
import os
import sys

import tiktoken.load
from pydantic import BaseModel

URL = os.environ["CLAWDBOT_URL"]
TOKEN = os.environ["CLAWDBOT_TOKEN"]
MODEL = "qwen3:32b"
LOADS = []


def _refuse_download(blobpath, expected_hash=None):
    """Stands in for tiktoken's loader: records the encoding asked for and refuses it."""
    LOADS.append(blobpath.rsplit("/", 1)[-1])
    raise RuntimeError("tiktoken would download " + blobpath)


tiktoken.load.read_file_cached = _refuse_download


class Weather(BaseModel):
    """The weather in one city."""

    city: str
    temperature: float


class Day(BaseModel):
    name: str
    sunny: bool


class Forecast(BaseModel):
    """A forecast: a place and its days (a nested model)."""

    place: Weather
    days: list[Day]


def llamaindex(**settings):
    """LlamaIndex's C{OpenAILike} with its defaults, plus C{settings}."""
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model=MODEL, api_base=URL, api_key=TOKEN, **settings)


def complete():
    """C{complete}, C{stream_complete} and C{chat} with the defaults (the legacy completions route)."""
    from llama_index.core.llms import ChatMessage

    llm = llamaindex()
    return {
        "complete": llm.complete("Say hello").text,
        "stream": "".join(part.delta for part in llm.stream_complete("Say hello")),
        "chat": llm.chat([ChatMessage(role="user", content="Say hello")]).message.content,
    }


def chat():
    """C{chat} and C{stream_chat} with C{is_chat_model=True} (the chat route)."""
    from llama_index.core.llms import ChatMessage

    llm = llamaindex(is_chat_model=True)
    messages = [ChatMessage(role="user", content="Say hello")]
    return {
        "chat": llm.chat(messages).message.content,
        "stream": "".join(part.delta for part in llm.stream_chat(messages)),
    }


def structured():
    """C{structured_predict} (a C{FunctionCallingProgram}: C{tool_choice} required, C{parallel_tool_calls} false), and a required tool call."""
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = llamaindex(is_chat_model=True, is_function_calling_model=True, context_window=40960)
    weather = llm.structured_predict(Weather, PromptTemplate("What is the weather in {city}?"), city="Hangzhou")
    tool = FunctionTool.from_defaults(fn=get_weather)
    response = llm.chat_with_tools([tool], user_msg="What is the weather in Hangzhou?", tool_required=True)
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    return {
        "structured": weather.model_dump(),
        "calls": [{"name": c.tool_name, "arguments": c.tool_kwargs} for c in calls],
    }


def instructor_tools():
    """instructor in its default mode (TOOLS): a flat model and a nested one."""
    import instructor
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=URL, api_key=TOKEN))
    messages = [{"role": "user", "content": "The weather in Hangzhou, please."}]
    weather = client.chat.completions.create(model=MODEL, response_model=Weather, messages=messages)
    forecast = client.chat.completions.create(model=MODEL, response_model=Forecast, messages=messages)
    return {"mode": client.mode.name, "weather": weather.model_dump(), "forecast": forecast.model_dump()}


CASES = {"complete": complete, "chat": chat, "structured": structured, "instructor": instructor_tools}


def main(case):
    try:
        out = CASES[case]()
    except Exception as e:
        out = {"raised": type(e).__name__, "message": str(e)}
    out["tiktoken"] = LOADS
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])

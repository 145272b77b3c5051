from twisted.application.service import ServiceMaker

clawdbot = ServiceMaker(
    "Clawdbot",
    "clawdbot.tap",
    "An authenticating, OpenAI-compatible gateway in front of Ollama.",
    "clawdbot",
)

"""OpenAI-compatible HTTP servers (vLLM, SGLang, TGI, llama.cpp's server, `transformers serve`):
the JSON client with bounded retries (client.py) and a server command started and stopped per
round (process.py). Sampling through them: ilrdpo.generation.server; reward: ilrdpo.scoring.remote."""

from ilrdpo.serving.client import Client, ServerError
from ilrdpo.serving.process import started_server

__all__ = ["Client", "ServerError", "started_server"]

"""osserve: serving for OpenAI's gpt-oss models."""

from osserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in the whole engine; import it only when asked for.
    if name == "LLM":
        from osserve.llm import LLM

        return LLM
    raise AttributeError(name)

"""LLM: the offline API, with vLLM's names (`LLM(model=...)`, `llm.generate(prompts, sampling_params)`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from osserve.config import EngineConfig
from osserve.distributed.launcher import make_engine
from osserve.engine.engine import Tokenizer
from osserve.engine.llm_engine import LLMEngine
from osserve.engine.outputs import RequestOutput
from osserve.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """Generate for many prompts at once, batched by the engine.

    `LLM(model="openai/gpt-oss-20b", max_batch_size=64, kv_cache_config={"free_gpu_memory_fraction": 0.8})`
    takes every engine option of EngineConfig by name.
    """

    def __init__(self, model: str = "", tokenizer: Tokenizer | None = None, **engine_options: Any):
        self.config = EngineConfig.from_dict({"model": model, **engine_options})
        if tokenizer is None:
            from osserve.harmony.encoding import get_tokenizer

            tokenizer = get_tokenizer()
        self.tokenizer = tokenizer
        core, self.model_name = make_engine(self.config)
        self.engine = LLMEngine(core, tokenizer)
        self._next_id = 0

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), prompt.get("prompt")
            if "prompt" in prompt:
                return self.tokenizer.encode(prompt["prompt"]), prompt["prompt"]
            raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, list | tuple):
            return list(prompt), None
        raise ValueError(
            f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}"
        )

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            list(sampling_params)
            if isinstance(sampling_params, Sequence)
            else [sampling_params] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                token_ids, text = self._prompt_ids(prompt)
                rid = f"llm-{self._next_id}"
                self._next_id += 1
                self.engine.add_request(rid, token_ids, p, prompt=text)
                ids.append(rid)
        except Exception:
            self.engine.abort(ids)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

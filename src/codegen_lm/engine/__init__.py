"""The inference engine: sampling (``sampling``), text streaming with stop strings (``text``), the prefix cache
(``prefix_cache``), continuous batching with chunked prefill (``scheduler``), the compiled decode step
(``compiled``), and the front ends (``generator``)."""

from .generator import Generator, default_prefix_cache_mb, hf_generate
from .prefix_cache import PrefixCache
from .sampling import GREEDY_TEMPERATURE, SamplingParams
from .scheduler import Completion, GenerationError, Scheduler, SequenceOutput
from .text import TextStream

__all__ = ["Completion", "GREEDY_TEMPERATURE", "GenerationError", "Generator", "PrefixCache", "SamplingParams",
           "Scheduler", "SequenceOutput", "TextStream", "default_prefix_cache_mb", "hf_generate"]

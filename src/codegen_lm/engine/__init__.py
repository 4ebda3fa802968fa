"""The inference engine: sampling (``sampling``), text streaming with stop strings (``text``), the prefix cache
(``prefix_cache``), continuous batching with chunked prefill (``scheduler``), speculative decoding (``speculate``),
the compiled decode step (``compiled``), and the front ends (``generator``)."""

from .generator import Generator, default_prefix_cache_mb, hf_generate
from .prefix_cache import PrefixCache
from .sampling import GREEDY_TEMPERATURE, SamplingParams
from .scheduler import Completion, GenerationError, Scheduler, SequenceOutput
from .speculate import SpeculativeConfig
from .text import TextStream

__all__ = ["Completion", "GREEDY_TEMPERATURE", "GenerationError", "Generator", "PrefixCache", "SamplingParams",
           "Scheduler", "SequenceOutput", "SpeculativeConfig", "TextStream", "default_prefix_cache_mb", "hf_generate"]

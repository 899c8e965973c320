"""specforge-vocab: choose an EAGLE-3 draft vocabulary from exactly the tokens SpecForge trains on."""

from specforge_vocab.counting.count import count_tokens
from specforge_vocab.errors import InputError, SpecForgeVocabError
from specforge_vocab.specforge.prepare import PrepareResult, before_training
from specforge_vocab.version import __version__

__all__ = ["before_training", "PrepareResult", "count_tokens", "InputError", "SpecForgeVocabError", "__version__"]

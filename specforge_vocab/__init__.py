"""specforge-vocab: choose an EAGLE-3 draft vocabulary from exactly the tokens SpecForge trains on."""
from .counting import count_tokens
from .errors import InputError, SpecForgeVocabError
from .hook import PrepareResult, before_training

__version__ = "0.1.0"
__all__ = ["before_training", "PrepareResult", "count_tokens", "InputError", "SpecForgeVocabError", "__version__"]

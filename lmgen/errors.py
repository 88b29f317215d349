"""Exceptions raised by lmgen; each message names the file or parameter at fault."""


class LmgenError(Exception):
    """Base class for every error lmgen raises on purpose."""


class ModelNotFoundError(LmgenError, FileNotFoundError):
    """A model path, file or Hub id that cannot be found or fetched."""


class UnsupportedModelError(LmgenError):
    """A model whose architecture or tensor format lmgen cannot run."""


class CorruptFileError(LmgenError):
    """A weights or tokenizer file that is truncated, malformed or inconsistent."""

"""Exceptions raised by lmgen; each message names the file or parameter at fault."""


class LmgenError(Exception):
    """Base class for every error lmgen raises on purpose; `path` is the file it is about, when there is one."""

    def __init__(self, message: str = "", path: object = None):
        super().__init__(message)
        self.path = path


class ModelNotFoundError(LmgenError, FileNotFoundError):
    """A model path, file or Hub id that cannot be found or fetched."""


class UnsupportedModelError(LmgenError):
    """A model whose architecture or tensor format lmgen cannot run."""


class CorruptFileError(LmgenError):
    """A weights, config or tokenizer file that is truncated, malformed or inconsistent."""


class ConfigError(CorruptFileError):
    """A model config (config.json, or a GGUF's metadata) whose `key` is missing or has the wrong type."""

    def __init__(self, path: object, key: str, problem: str):
        super().__init__(f"{path or 'model config'}: key {key!r} {problem}", path)
        self.key = key

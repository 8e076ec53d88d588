"""User-facing failures. The CLI turns a WsfoldError into one stderr line and its exit code; anything else is a bug."""

from __future__ import annotations

import errno

# What the machine, not wsfold, refused: a full disk, a read-only or foreign file, a name too long.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EFBIG,  # past the file size limit (ulimit -f) or the file system's
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.EIO,
    errno.EMFILE,
    errno.ENFILE,
}


class WsfoldError(Exception):
    """Root of every failure caused by the user's input. ``hint`` says how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class SourceError(WsfoldError):
    """SOURCE is missing, empty, truncated or not a checkpoint."""


class PickleRefusedError(SourceError):
    """SOURCE holds code-bearing pickle data and --allow-pickle was not given."""


class ArchitectureError(WsfoldError):
    """--arch cannot be imported or called, or the checkpoint does not fit the architecture."""


class UserCodeError(ArchitectureError):
    """The user's own code (the --arch callable, a model's forward, a load hook) raised."""


class ManifestError(SourceError):
    """A wsfold-baked file whose manifest is malformed or does not match its tensors."""


class NonFiniteError(WsfoldError):
    """A layer's weight holds NaN or inf; baking it would make the model compute NaN (allow_nonfinite to accept)."""


class OutputError(WsfoldError):
    """The output path exists, equals SOURCE, has an unknown suffix, or the model cannot be written in that format."""


class OptionError(WsfoldError):
    """An option value is malformed or missing (for example --input-shape)."""


class ExportError(WsfoldError):
    """The model cannot be exported as asked (for example input-size-dependent padding with --dynamic-hw)."""


class CalibrationError(WsfoldError):
    """A calibration or holdout set that cannot be used: missing, empty, NaN, not fitting the graph."""


class QuantizeError(WsfoldError):
    """The graph cannot be quantized as asked (onnxruntime's quantizer refuses it)."""


class VerifyInputError(WsfoldError):
    """verify cannot run: ONNX file missing or unreadable, inputs that do not match the graph."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none (for one-line reports)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def brief(text: str, limit: int = 160) -> str:
    """``text``'s first line, shortened to ``limit`` characters at a word boundary (marked with '...') when
    longer: a message quoted inside another stays readable and never ends mid-word."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[: limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return (cut or line[:limit]) + " ..."

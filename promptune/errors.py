"""The one exception family promptune raises for user mistakes; the CLI turns each into one sentence."""


class PromptuneError(Exception):
    """A user-facing error: the message is one clear sentence, shown without a traceback."""


class DataError(PromptuneError):
    """The image folder cannot be used as asked."""


class BackboneError(PromptuneError):
    """The backbone name or weights cannot be resolved or loaded."""


class PromptFileError(PromptuneError):
    """A prompt file is missing, corrupt, or does not fit the model it is loaded into."""


class DeviceError(PromptuneError):
    """The requested device is not available on this machine."""


class MethodError(PromptuneError):
    """A method cannot be used with this backbone or these options."""

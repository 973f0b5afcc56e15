"""Exceptions a user can cause. Each message names the input and what to do about it."""


class AudiodiffError(Exception):
    """A problem with the user's input, configuration or storage; the message says which and why."""


class BadAudioError(AudiodiffError):
    """An input that is not usable audio (empty, truncated, not audio, no samples, non-finite samples)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class BadImageError(BadAudioError):
    """A spectrogram image that is not a PNG of the expected size and mode (damaged, a decompression bomb)."""

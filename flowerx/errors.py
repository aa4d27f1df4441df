"""The one exception type flowerx raises for bad input."""


class FlowerxError(ValueError):
    """A problem with the user's input (file, model, argument), with a message fit for one line."""


class ImageError(FlowerxError):
    """An image could not be read or decoded: `source` (its path or kind) and `reason`."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason

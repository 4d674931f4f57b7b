"""The one error of the image code (re-exported by ``sandpool._isolation.images``)."""


class ImageError(Exception):
    """An image that cannot be named, pulled, stored or used; the message says what to do."""

"""Guest images: the built-in default guest, built from Debian packages and cached."""

from torpor.images.builtin import GuestImage, builtin_image, ensure_builtin_image

__all__ = ["GuestImage", "builtin_image", "ensure_builtin_image"]

"""Copy engine: reflink-first file and directory copies with a sparse fallback.

Knows nothing of VMs: it copies files and trees and reports how.
"""

from torpor.copy.engine import (
    CLONE_UNSUPPORTED_ERRNOS,
    CopyCancelled,
    CopyReport,
    CopyUnsupported,
    copy_file,
    copy_tree,
)

__all__ = ["CLONE_UNSUPPORTED_ERRNOS", "CopyCancelled", "CopyReport", "CopyUnsupported",
           "copy_file", "copy_tree"]

"""The image tests also use the copy tests' XFS (reflink) mount."""

from tests.copy.conftest import xfs_dir

__all__ = ["xfs_dir"]

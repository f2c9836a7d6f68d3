"""OCI images: list, pull, remove (instances of an image are created by POST /instances
with `image`, which pulls a missing one)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Annotated

from fastapi import APIRouter, Query, Response

from torpor.api.deps import ERROR_RESPONSES, GUARDED, Manager, OpId, Tracker
from torpor.api.models import ImageReference, PullRequest
from torpor.operations.images import ImageInfo

router = APIRouter(dependencies=GUARDED, responses=ERROR_RESPONSES)


@router.get("/images", tags=["images"])
async def list_images(manager: Manager) -> list[ImageInfo]:
    return await manager.image_list()


@router.post("/images/pull", tags=["images"])
async def pull_image(manager: Manager, body: PullRequest, op: OpId,
                     operations: Tracker) -> ImageInfo:
    """Pull from a registry (linux/amd64, verified by digest; layers already here are
    not fetched again)."""
    async with operations.track(op, "image-pull", body.reference):
        return await manager.image_pull(body.reference, insecure=body.insecure)


@router.delete("/images", tags=["images"], status_code=204)
async def remove_image(manager: Manager,
                       reference: Annotated[ImageReference, Query()]) -> Response:
    """Forget a reference; the image's data goes with its last one (409 while instances
    use it)."""
    await manager.image_remove(reference)
    return Response(status_code=204)
